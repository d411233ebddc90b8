"""Self-checks for the metrics: corpus BLEU, ROUGE and sliding-window perplexity."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _seed,
    watching,
)

# ----------------------------------------------------------------------------- metrics

_WORDS = ("the a model token data train loss rate value layer head sample text word code file line test run "
          "batch step time size list name type call return").split()


def _random_sentence(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]


def _perturb(rng: random.Random, words: list[str]) -> list[str]:
    """A noisy copy: some words replaced, dropped or inserted, as a system output differs from its reference."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        out.append(rng.choice(_WORDS) if r < 0.3 else w)
        if rng.random() < 0.05:
            out.append(rng.choice(_WORDS))
    return out


def _score_of(x, field: str):
    """Accept a number, an object with the field (e.g. .score, .fmeasure), or a dict holding it."""
    if isinstance(x, dict):
        x = x.get(field, x)
    return float(getattr(x, field, x))


def _bleu_hint(got: float, expected, hyps: list[str], refs: list[list[str]]) -> str:
    from metrics.bleu import sentence_bleu

    sys_len = expected.sys_len
    closest = ("sacrebleu's ref_len takes per segment the reference length closest to the hypothesis length, a tie "
               f"going to the shorter ({expected.ref_len} here)")
    shortest = sum(min(len(r[i].split()) for r in refs) for i in range(len(hyps)))
    if expected.bp < 1 and abs(got - expected.score / expected.bp) <= 1e-6:
        also = (f"; if you took the shortest reference of each segment (ref_len {shortest}, not above sys_len "
                f"{sys_len}) that is why: {closest}") if shortest != expected.ref_len and shortest <= sys_len else ""
        return ("your score equals the reference's without the brevity penalty (hypotheses shorter than references)"
                + also)
    for pick_len, name in ((min, "the shortest"), (max, "the longest")):
        ref_len = sum(pick_len(len(r[i].split()) for r in refs) for i in range(len(hyps)))
        bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len) if sys_len else 0.0  # as score_from_stats
        if ref_len != expected.ref_len and expected.bp > 0 and abs(got - expected.score / expected.bp * bp) <= 1e-6:
            return f"your brevity penalty uses {name} reference of each segment (ref_len {ref_len}); {closest}"
    mean = np.mean([sentence_bleu(h, [r[i] for r in refs], smooth_method="none", use_effective_order=False).score
                    for i, h in enumerate(hyps)])
    if abs(got - mean) <= 1e-6:
        return "that is the mean of sentence BLEUs: corpus BLEU sums clipped counts over all segments, then divides"
    return ("compare your clipped n-gram counts (max count over references), totals, sys_len and ref_len "
            "with the pieces above")


WATCH_BLEU = ("metrics.bleu.corpus_bleu", "metrics.bleu.sentence_bleu", "metrics.bleu.score_from_stats",
              "sacrebleu.corpus_bleu", "sacrebleu.metrics.bleu.BLEU.corpus_score")


@_check(hints=(
    "Corpus BLEU pools the counts of all segments before dividing: per order 1 to 4, clipped n-gram matches over all "
    "hypothesis n-grams; then the geometric mean of the four precisions times the brevity penalty. Invariant: "
    "hypotheses equal to their references (4+ words) score 100, and no match at some order scores 0.",
    "Clip each hypothesis n-gram's count at the largest count it has in any one reference of its segment. For the "
    "brevity penalty each segment adds the reference length closest to its hypothesis length (a tie goes to the "
    "shorter one); the penalty is exp(1 - ref_len / sys_len) when sys_len < ref_len, else 1. A mean of sentence "
    "BLEUs is not corpus BLEU."))
def bleu(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(hypotheses, references) -> corpus BLEU on a 0-100 scale (a number, or an object with .score).

    hypotheses is a list of strings; references a list of reference streams (references[k][i] is the k-th
    reference of segment i), sacrebleu's order. Texts are lowercase words separated by single spaces, so
    splitting on spaces tokenizes them. No smoothing, n-grams up to 4, brevity penalty on the corpus lengths;
    a corpus with no match at some order scores 0.
    Reference: metrics.bleu.corpus_bleu(..., smooth_method="none"), itself equal to sacrebleu; tolerance 1e-6.
    """
    from metrics.bleu import corpus_bleu

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        n_seg, n_refs = rng.randint(5, 30), rng.randint(1, 3)
        refs = [[_random_sentence(rng, 6, 25) for _ in range(n_seg)] for _ in range(n_refs)]
        short = trial % 2 == 1  # every other corpus is shorter than its references: the brevity penalty bites
        hyps = [_perturb(rng, refs[0][i][: len(refs[0][i]) * 2 // 3] if short else refs[0][i]) for i in range(n_seg)]
        hyps_s = [" ".join(h) for h in hyps]
        refs_s = [[" ".join(r) for r in stream] for stream in refs]
        what = (f"trial {trial}: {n_seg} segments, {n_refs} reference stream(s); e.g. hypothesis 0 = "
                f"{hyps_s[0]!r}, reference 0 = {refs_s[0][0]!r}")
        expected = corpus_bleu(hyps_s, refs_s, smooth_method="none")
        try:
            with watching(WATCH_BLEU, called, fn):
                got = _score_of(fn(list(hyps_s), [list(r) for r in refs_s]), "score")
        except Exception as e:
            msg = _crash(e, what)
            if isinstance(e, (ValueError, ZeroDivisionError)):
                msg += ("\n  hint: when some n-gram order has no match its precision is 0 and log(0) is undefined; "
                        "without smoothing BLEU is then 0 (sacrebleu returns 0.0)")
            return _finish("bleu", False, msg, s, log)
        if not abs(got - expected.score) <= 1e-6:
            prec = ", ".join(f"{p:.4g}" for p in expected.precisions)
            msg = (f"{what}\n  expected BLEU {expected.score:.6f}, got {got:.6f}\n  the reference's pieces: "
                   f"precisions (%) [{prec}], brevity penalty {expected.bp:.6f}, sys_len {expected.sys_len}, "
                   f"ref_len {expected.ref_len} (closest reference length per segment, summed)\n  hint: "
                   + _bleu_hint(got, expected, hyps_s, refs_s))
            return _finish("bleu", False, msg, s, log)
    return _finish("bleu", True, f"{trials} random corpora (1-3 references, with and without the brevity penalty): "
                   "equal to metrics.bleu.corpus_bleu within 1e-6", s, log,
                   uses_reference=called or _calls_reference(fn, {"corpus_bleu", "sacrebleu", "BLEU"}))


WATCH_ROUGE = ("metrics.rouge.rouge_pair", "metrics.rouge.rouge_scores",
               "rouge_score.rouge_scorer.RougeScorer.score")


@_check(hints=(
    "ROUGE-1 and ROUGE-2 count shared unigrams and bigrams, each clipped at the smaller of its two counts; ROUGE-L "
    "uses the length of the longest common subsequence. Precision divides by the prediction's count, recall by the "
    "reference's, F is their harmonic mean. Invariant: identical texts score an F of 1, an empty prediction 0.",
    "The longest common subsequence allows gaps (dynamic programming over the two word lists), unlike the longest "
    "common substring. A one-word text has no bigrams, and when precision and recall are both 0 the F is 0, not a "
    "division by zero."))
def rouge(fn: Callable, pairs: int = 40, seed: int | None = None, log: bool = True) -> Result:
    """fn(prediction, reference) -> {"rouge1": F, "rouge2": F, "rougeL": F} for two strings.

    Texts are lowercase words separated by spaces (no stemming, no sentence splitting). Values are F-measures
    (numbers, or objects with .fmeasure). Reference: metrics.rouge.rouge_pair, equal to rouge-score; tolerance 1e-9.
    """
    from metrics.rouge import rouge_pair

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for i in range(pairs):
        ref = _random_sentence(rng, 1, 20)
        pred = _perturb(rng, ref) if i % 4 else _random_sentence(rng, 0, 12)  # some unrelated, some empty
        p, r = " ".join(pred), " ".join(ref)
        what = f"pair {i}: prediction {p!r}, reference {r!r}"
        expected = rouge_pair(p, r, ["rouge1", "rouge2", "rougeL"])
        try:
            with watching(WATCH_ROUGE, called, fn):
                got = fn(p, r)
            got = {k: _score_of(got[k], "fmeasure") for k in ("rouge1", "rouge2", "rougeL")}
        except Exception as e:
            return _finish("rouge", False, _crash(e, what), s, log)
        for k in ("rouge1", "rouge2", "rougeL"):
            if not abs(got[k] - expected[k].fmeasure) <= 1e-9:
                e = expected[k]
                hint = {"rouge1": "unigram matches are min(count in prediction, count in reference) per word",
                        "rouge2": "bigram matches are clipped the same way; a one-word text has no bigrams",
                        "rougeL": "rouge-L uses the longest common subsequence (gaps allowed), not substring"}[k]
                msg = (f"{what}\n  {k}: expected F {e.fmeasure:.6f} (precision {e.precision:.6f}, recall "
                       f"{e.recall:.6f}), got {got[k]:.6f}\n  hint: {hint}")
                return _finish("rouge", False, msg, s, log)
    return _finish("rouge", True, f"{pairs} random pairs (noisy copies, unrelated and empty predictions): rouge1, "
                   "rouge2 and rougeL F equal to metrics.rouge within 1e-9", s, log,
                   uses_reference=called or _calls_reference(
                       fn, {"rouge_pair", "rouge_scores", "rouge_scorer", "RougeScorer"}))

def _all_targets_ppl(model_fn, ids: torch.Tensor, window: int, stride: int) -> float:
    """A classic mistake: every window scores all of its targets, so overlapping tokens count several times."""
    nll, n, b = 0.0, 0, 0
    while True:
        e = min(b + window, len(ids) - 1)
        logits = model_fn(ids[None, b:e])
        nll += float(F.cross_entropy(logits[0].float(), ids[b + 1 : e + 1], reduction="sum"))
        n += e - b
        if e == len(ids) - 1:
            return math.exp(nll / n)
        b += stride


WATCH_PERPLEXITY = ("metrics.perplexity.perplexity", "course.check.metrics._all_targets_ppl")


@_check(hints=(
    "Windows start at 0, stride, 2*stride, ...; each feeds up to `window` tokens and scores only the targets no "
    "earlier window scored, so every token but the first is scored exactly once. Invariant: the count of scored "
    "tokens is len(token_ids) - 1 whatever the stride, and a stride equal to the window gives non-overlapping "
    "chunks.",
    "Remember where the scored region ends: a new window scores only its targets past that point (with overlap, the "
    "last few positions), the earlier ones serving as context; the last window is the one whose final target is the "
    "stream's last token. Sum the NLL and the counts over windows and exponentiate their ratio once at the end."))
def perplexity(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(model_fn, token_ids, window, stride) -> perplexity (a number, or an object with .perplexity).

    model_fn maps a (1, T) LongTensor of ids to logits (1, T, vocab), T <= window; token_ids is a 1-D LongTensor.
    Windows start at b = 0, stride, 2*stride, ...; a window feeds ids[b : b+window] (cut so the last input is
    ids[-2]) and predicts the next token at every position; it scores only targets no earlier window scored,
    and the last window is the one that scores the stream's last token. Every token but the first is scored
    exactly once; perplexity = exp(total NLL / scored tokens). The model is a small random GPT with sharp
    predictions, so the context each token gets matters. Reference: metrics.perplexity.perplexity; relative
    tolerance 1e-4.
    """
    from metrics.perplexity import perplexity as ref_perplexity
    from minilm.config import ModelConfig
    from minilm.model import GPT

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25, generator=g)

    def model_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids)[0]

    for trial in range(trials):
        n = int(torch.randint(30, 100, (1,), generator=g))
        window = int(torch.randint(4, 33, (1,), generator=g))
        stride = window if trial == 0 else int(torch.randint(max(1, window // 4), window, (1,), generator=g))
        ids = torch.randint(0, 50, (n,), generator=g)
        what = (f"trial {trial}: {n} random token ids (vocab 50), window={window}, stride={stride}; "
                f"ids start {ids[:8].tolist()}")
        expected = ref_perplexity(model_fn, ids, window, stride).perplexity
        try:
            with watching(WATCH_PERPLEXITY, called, fn):
                got = _score_of(fn(model_fn, ids.clone(), window, stride), "perplexity")
        except Exception as e:
            return _finish("perplexity", False, _crash(e, what), s, log)
        if not abs(got - expected) <= 1e-4 * expected:
            hint = ""
            if stride < window and abs(got - _all_targets_ppl(model_fn, ids, window, stride)) <= 1e-4 * got:
                hint = ("\n  hint: your windows score all their targets; with stride < window a window must "
                        "score only the tokens no earlier window scored")
            elif stride < window and abs(got - ref_perplexity(model_fn, ids, window, window).perplexity) <= 1e-4 * got:
                hint = "\n  hint: that is the non-overlapping result (stride = window): the stride is ignored"
            else:
                hint = "\n  hint: add up NLL sums and token counts over windows; divide once at the end"
            return _finish("perplexity", False, f"{what}\n  expected perplexity {expected:.6f}, got {got:.6f}{hint}",
                           s, log)
    return _finish("perplexity", True, f"{trials} random streams, windows and strides (one non-overlapping): equal to "
                   "metrics.perplexity.perplexity within 1e-4 (relative)", s, log,
                   uses_reference=called or _calls_reference(fn, {"perplexity", "ref_perplexity"}))
