"""BLEU (Papineni et al., 2002) from scratch, computed the way sacrebleu 2.x computes it.

    from metrics.bleu import corpus_bleu, sentence_bleu
    result = corpus_bleu(hyps, [refs])            # one reference stream; [refs_a, refs_b] for two
    result.score, result.precisions, result.bp, result.sys_len, result.ref_len, result.signature

How it works, in four steps:
  1. Tokenize every segment (13a = the WMT mteval-v13a rules, intl, char or none), optionally lowercased.
  2. Per segment, count hypothesis n-grams (n = 1..4) and clip each count to the most times the n-gram
     occurs in any one reference; the reference length is the one closest to the hypothesis length.
  3. Sum those statistics over the corpus. Corpus BLEU is not an average of sentence scores.
  4. Score = brevity penalty * geometric mean of the n-gram precisions, on a 0-100 scale.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

TOKENIZERS = ("13a", "intl", "char", "none")
SMOOTH_DEFAULTS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
LOG_ZERO = -9999999999  # what sacrebleu uses for log(0): a zero precision drives the score to 0

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers. Each maps one line to a list of tokens.

# 13a step 1 pads these ASCII characters with spaces wherever they are: { | } ~ [ \ ] ^ _ ` space ! " # $ % &
# ( ) * + : ; < = > ? @ /. A translate table does that in one pass. Period, comma and dash depend on their
# neighbours, so they get regular expressions.
_PAD_13A = str.maketrans({c: f" {c} " for c in "{|}~[\\]^_` !\"#$%&()*+:;<=>?@/"})
_NONDIGIT_THEN_PERIOD = re.compile(r"([^0-9])([.,])")  # "word." -> "word . "
_PERIOD_THEN_NONDIGIT = re.compile(r"([.,])([^0-9])")  # ".word" -> " . word"
_DIGIT_THEN_DASH = re.compile(r"([0-9])(-)")  # "3-" -> "3 - "


def tokenize_13a(line: str) -> list[str]:
    """The mteval-v13a tokenizer used for WMT: split punctuation off words, keep 3.14 and 1,000 whole."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # undo the four XML escapes mteval knows about, in its order
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} ".translate(_PAD_13A)
    if "." in line or "," in line:
        line = _NONDIGIT_THEN_PERIOD.sub(r"\1 \2 ", line)
        line = _PERIOD_THEN_NONDIGIT.sub(r" \1 \2", line)
    if "-" in line:
        line = _DIGIT_THEN_DASH.sub(r"\1 \2 ", line)
    return line.split()


def _unicode_class(first_letter: str) -> str:
    """A regex character class body holding every code point whose Unicode category starts with first_letter."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == first_letter:
            if start is None:
                start = cp
            elif cp != prev + 1:
                ranges.append((start, prev))
                start = cp
            prev = cp
    ranges.append((start, prev))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@functools.cache
def _intl_patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    # Built once on first use (~0.5 s): the stdlib `re` has no \p{...}, so we list the code points ourselves.
    # Python's unicodedata may be an older Unicode version than sacrebleu's `regex`; they differ only on
    # code points that the older version leaves unassigned.
    p, s, n = _unicode_class("P"), _unicode_class("S"), _unicode_class("N")
    return (re.compile(f"([^{n}])([{p}])"), re.compile(f"([{p}])([^{n}])"), re.compile(f"([{s}])"))


def tokenize_intl(line: str) -> list[str]:
    """mteval-v14 international tokenizer: split Unicode punctuation unless it sits between digits, and symbols."""
    punct_after_nonnum, punct_before_nonnum, symbol = _intl_patterns()
    line = punct_after_nonnum.sub(r"\1 \2 ", line)
    line = punct_before_nonnum.sub(r" \1 \2", line)
    return symbol.sub(r" \1 ", line).split()


def tokenize_char(line: str) -> list[str]:
    """Every non-space character is a token (for languages written without spaces)."""
    return [c for c in line if not c.isspace()]


def tokenize_none(line: str) -> list[str]:
    """Split on whitespace only: for text that is already tokenized."""
    return line.split()


_TOKENIZE = {"13a": tokenize_13a, "intl": tokenize_intl, "char": tokenize_char, "none": tokenize_none}


def tokenize(line: str, tokenizer: str = "13a", lowercase: bool = False) -> list[str]:
    """Tokens of one segment as BLEU sees them: lowercased first if asked, trailing whitespace dropped."""
    if lowercase:
        line = line.lower()
    return _TOKENIZE[tokenizer](line.rstrip())


# ---------------------------------------------------------------------------------------------------------------
# Statistics and score.


def ngram_counts(tokens: list[str], max_order: int = 4) -> Counter:
    """Counts of every n-gram (as a tuple) for n = 1..max_order, all in one Counter."""
    counts: Counter = Counter()
    for n in range(1, max_order + 1):
        counts.update(zip(*[tokens[i:] for i in range(n)]))
    return counts


def closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length nearest the hypothesis length; on a tie, the shorter one."""
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def segment_stats(hyp_tokens: list[str], ref_counts: Counter, ref_lens: list[int], max_order: int = 4) -> list[int]:
    """[hyp_len, ref_len, correct_1..correct_N, total_1..total_N] for one segment.

    ref_counts holds, for each n-gram, the most times it occurs in any single reference.
    """
    correct = [0] * max_order
    total = [max(0, len(hyp_tokens) - n) for n in range(max_order)]
    for gram, count in ngram_counts(hyp_tokens, max_order).items():
        ref_count = ref_counts.get(gram)
        if ref_count:
            correct[len(gram) - 1] += count if count < ref_count else ref_count
    return [len(hyp_tokens), closest_ref_len(len(hyp_tokens), ref_lens), *correct, *total]


def reference_info(refs_tokens: list[list[str]], max_order: int = 4) -> tuple[Counter, list[int]]:
    """Max-over-references n-gram counts and the reference lengths of one segment."""
    merged = ngram_counts(refs_tokens[0], max_order)
    for tokens in refs_tokens[1:]:
        for gram, count in ngram_counts(tokens, max_order).items():
            if count > merged[gram]:
                merged[gram] = count
    return merged, [len(t) for t in refs_tokens]


@dataclass
class BLEUScore:
    """A BLEU result with sacrebleu's field names. score, precisions are on a 0-100 scale."""

    score: float
    counts: list
    totals: list
    precisions: list[float]
    bp: float
    sys_len: int
    ref_len: int
    signature: str = ""
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.sys_len / self.ref_len if self.ref_len else 0

    def format(self, width: int = 2) -> str:
        prec = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.{width}f} {prec} (BP = {self.bp:.3f} ratio = {self.ratio:.3f} "
                f"hyp_len = {self.sys_len:d} ref_len = {self.ref_len:d})")

    def __str__(self) -> str:
        return self.format()


def score_from_stats(correct: list, total: list, sys_len: int, ref_len: int, smooth_method: str = "none",
                     smooth_value: float | None = None, effective_order: bool = False,
                     max_ngram_order: int = 4) -> BLEUScore:
    """BLEU from summed statistics: brevity penalty times the geometric mean of the smoothed precisions.

    Smoothing (Chen & Cherry, 2014) decides what a zero-match order contributes:
      none  - nothing: the score is 0; floor - precision smooth_value/total (default 0.1);
      add-k - add smooth_value (default 1) to matches and totals of orders >= 2;
      exp   - the k-th order with no matches gets precision 1 / (2^k * total) (mteval's method).
    effective_order stops at the highest order the hypotheses have n-grams of (for short sentences).
    As sacrebleu does, add-k reports the smoothed counts and totals.
    """
    correct, total = list(correct), list(total)
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_ngram_order
    if not any(correct):
        return BLEUScore(0.0, correct, total, precisions, bp, sys_len, ref_len)

    exp_factor = 1.0
    order = max_ngram_order
    for n in range(max_ngram_order):
        if smooth_method == "add-k" and n > 0:
            correct[n] += smooth_value
            total[n] += smooth_value
        if total[n] == 0:
            break  # no hypothesis n-grams of this order or above
        if effective_order:
            order = n + 1
        if correct[n] == 0:
            if smooth_method == "exp":
                exp_factor *= 2
                precisions[n] = 100.0 / (exp_factor * total[n])
            elif smooth_method == "floor":
                precisions[n] = 100.0 * smooth_value / total[n]
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    logs = [math.log(p) if p != 0.0 else LOG_ZERO for p in precisions[:order]]
    score = bp * math.exp(sum(logs) / order)
    return BLEUScore(score, correct, total, precisions, bp, sys_len, ref_len)


def _signature(num_refs: int | str, lowercase: bool, effective_order: bool, tokenize: str, smooth_method: str,
               smooth_value: float | None) -> str:
    smooth = smooth_method
    if SMOOTH_DEFAULTS[smooth_method] is not None:
        value = SMOOTH_DEFAULTS[smooth_method] if smooth_value is None else smooth_value
        smooth += f"[{value:.2f}]"
    return (f"nrefs:{num_refs}|case:{'lc' if lowercase else 'mixed'}|eff:{'yes' if effective_order else 'no'}"
            f"|tok:{tokenize}|smooth:{smooth}")


def _check_options(smooth_method: str, tokenize: str, max_ngram_order: int) -> None:
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"smooth_method={smooth_method!r} is unknown; use one of {list(SMOOTH_DEFAULTS)}")
    if tokenize not in _TOKENIZE:
        raise ValueError(f"tokenize={tokenize!r} is unknown; use one of {list(TOKENIZERS)}")
    if not isinstance(max_ngram_order, int) or max_ngram_order < 1:
        raise ValueError(f"max_ngram_order={max_ngram_order!r} must be a positive integer (BLEU uses 4)")


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]]) -> None:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise TypeError("hypotheses must be a list of strings, one per segment (for one sentence use sentence_bleu)")
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty: BLEU needs at least one segment")
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise TypeError(f"hypotheses[{i}] is a {type(h).__name__}, not a string")
    if isinstance(references, str) or not isinstance(references, Sequence) or len(references) == 0:
        raise TypeError("references must be a list of reference streams, e.g. corpus_bleu(hyps, [refs])")
    if isinstance(references[0], str):
        raise TypeError("references is a flat list of strings; pass a list of streams: corpus_bleu(hyps, [refs])")
    for k, stream in enumerate(references):
        if isinstance(stream, str) or not isinstance(stream, Sequence):
            raise TypeError(f"references[{k}] must be a list of strings (one per hypothesis)")
        if len(stream) != len(hypotheses):
            raise ValueError(f"references[{k}] has {len(stream)} segments but there are {len(hypotheses)} "
                             "hypotheses; every reference stream needs one entry per hypothesis (None for none)")
        for i, r in enumerate(stream):
            if r is not None and not isinstance(r, str):
                raise TypeError(f"references[{k}][{i}] is a {type(r).__name__}, not a string (or None)")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], smooth_method: str = "exp",
                smooth_value: float | None = None, lowercase: bool = False, tokenize: str = "13a",
                use_effective_order: bool = False, max_ngram_order: int = 4) -> BLEUScore:
    """Corpus BLEU of hypotheses against one or more reference streams (sacrebleu's argument order).

    references[k][i] is the k-th reference of segment i; None marks a missing reference when segments have
    different numbers of references.
    """
    _check_options(smooth_method, tokenize, max_ngram_order)
    _check_corpus(hypotheses, references)
    tok = _TOKENIZE[tokenize]
    prep = (lambda s: tok(s.lower().rstrip())) if lowercase else (lambda s: tok(s.rstrip()))
    width = 2 + 2 * max_ngram_order
    sums = [0] * width
    num_refs = set()
    for i, hyp in enumerate(hypotheses):
        refs = [stream[i] for stream in references if stream[i] is not None]
        if not refs:
            raise ValueError(f"segment {i} has no reference (all streams hold None there)")
        num_refs.add(len(refs))
        ref_counts, ref_lens = reference_info([prep(r) for r in refs], max_ngram_order)
        stats = segment_stats(prep(hyp), ref_counts, ref_lens, max_ngram_order)
        for j in range(width):
            sums[j] += stats[j]
    result = score_from_stats(sums[2 : 2 + max_ngram_order], sums[2 + max_ngram_order :], sums[0], sums[1],
                              smooth_method, smooth_value, use_effective_order, max_ngram_order)
    nrefs = num_refs.pop() if len(num_refs) == 1 else "var"
    result.signature = _signature(nrefs, lowercase, use_effective_order, tokenize, smooth_method, smooth_value)
    return result


def sentence_bleu(hypothesis: str, references: Sequence[str], smooth_method: str = "exp",
                  smooth_value: float | None = None, lowercase: bool = False, tokenize: str = "13a",
                  use_effective_order: bool = True, max_ngram_order: int = 4) -> BLEUScore:
    """BLEU of one hypothesis against its references (a list of strings). Effective order is on by default."""
    if not isinstance(hypothesis, str):
        raise TypeError(f"hypothesis must be a string, got {type(hypothesis).__name__}")
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, e.g. sentence_bleu(hyp, [ref])")
    if len(references) == 0:
        raise ValueError("references is empty: sentence_bleu needs at least one reference string")
    return corpus_bleu([hypothesis], [[r] for r in references], smooth_method, smooth_value, lowercase, tokenize,
                       use_effective_order, max_ngram_order)
