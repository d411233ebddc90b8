"""ROUGE (Lin, 2004) from scratch, scored the way Google's rouge-score package scores it.

    from metrics.rouge import rouge_scores, bootstrap_aggregate
    scores = rouge_scores(predictions, references, ["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores[0]["rougeL"].fmeasure
    summary = bootstrap_aggregate(scores, seed=0)      # {"rougeL": AggregateScore(low, mid, high), ...}

Note the argument order: predictions first, like our BLEU (rouge-score's scorer.score takes the target first).

  rouge-N     n-gram overlap: matches = sum over n-grams of min(count in prediction, count in reference);
              precision = matches / prediction n-grams, recall = matches / reference n-grams.
  rouge-L     longest common subsequence (LCS) of the two token lists in place of the matches.
  rouge-Lsum  summary-level LCS: texts are split into sentences on newlines; each reference sentence is
              matched against every prediction sentence and the union of the matched words counts, each
              word at most as often as it occurs on both sides.
F is the harmonic mean 2PR / (P + R). With several references, each type keeps the reference with the best F.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


class AggregateScore(NamedTuple):
    low: Score
    mid: Score
    high: Score


_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")
_ROUGE_N = re.compile(r"rouge([1-9][0-9]*)$")


@functools.cache
def _porter():
    from nltk.stem import porter

    return porter.PorterStemmer()


@functools.lru_cache(maxsize=2**16)
def stem(word: str) -> str:
    """NLTK's Porter stemmer, remembered per word: stemming the same word twice is most of ROUGE's cost."""
    return _porter().stem(word)


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's tokenizer: lowercase, anything outside a-z0-9 separates words, stem words longer than 3."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [stem(t) if len(t) > 3 else t for t in tokens]
        tokens = [t for t in tokens if _VALID.match(t)]
    return tokens


def fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def ngram_score(target: list[str], prediction: list[str], n: int) -> Score:
    """rouge-N for one pair of token lists."""
    t = Counter(zip(*[target[i:] for i in range(n)]))
    p = Counter(zip(*[prediction[i:] for i in range(n)]))
    matches = 0
    for gram, count in t.items():
        other = p.get(gram, 0)
        matches += count if count < other else other
    precision = matches / max(sum(p.values()), 1)
    recall = matches / max(sum(t.values()), 1)
    return Score(precision, recall, fmeasure(precision, recall))


def lcs_rows(a: list[str], b: list[str]) -> list[int]:
    """Rows of the LCS table of a (rows) against b (columns), each packed into one integer.

    Bit-parallel LCS (Allison & Dix 1986, Hyyrö 2004): row i is a bit vector V over the positions of b
    where a zero bit at j means table[i][j+1] = table[i][j] + 1, so table[i][j] is the number of zeros
    among the low j bits. One row costs a few big-integer operations instead of len(b) Python steps.
    """
    full = (1 << len(b)) - 1
    where: dict[str, int] = {}
    for j, tok in enumerate(b):
        where[tok] = where.get(tok, 0) | (1 << j)
    v = full
    rows = [v]
    for tok in a:
        u = v & where.get(tok, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    return rows


def lcs_length(a: list[str], b: list[str]) -> int:
    return len(b) - lcs_rows(a, b)[-1].bit_count()


def lcs_indices(a: list[str], b: list[str]) -> list[int]:
    """Positions in a of one longest common subsequence, chosen as rouge-score's backtrack chooses it."""
    rows = lcs_rows(a, b)
    # table[i][j] = j - (ones among the low j bits of row i)
    i, j = len(a), len(b)
    out = []
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            out.append(i - 1)
            i -= 1
            j -= 1
        else:
            left = (j - 1) - (rows[i] & ((1 << (j - 1)) - 1)).bit_count()
            up = j - (rows[i - 1] & ((1 << j) - 1)).bit_count()
            if left > up:
                j -= 1
            else:
                i -= 1
    return out[::-1]


def lcs_score(target: list[str], prediction: list[str]) -> Score:
    """rouge-L for one pair of token lists."""
    if not target or not prediction:
        return Score(0.0, 0.0, 0.0)
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return Score(precision, recall, fmeasure(precision, recall))


def summary_lcs_score(target_sents: list[list[str]], prediction_sents: list[list[str]]) -> Score:
    """rouge-Lsum: union LCS of each target sentence against all prediction sentences, hits capped by counts."""
    m = sum(map(len, target_sents))
    n = sum(map(len, prediction_sents))
    if not m or not n:
        return Score(0.0, 0.0, 0.0)
    left_t = Counter(tok for s in target_sents for tok in s)
    left_p = Counter(tok for s in prediction_sents for tok in s)
    hits = 0
    for ref in target_sents:
        union = set()
        for cand in prediction_sents:
            union.update(lcs_indices(ref, cand))
        for i in sorted(union):
            tok = ref[i]
            # A word counts only while both sides still have unmatched copies of it (ROUGE-1.5.5 does this).
            if left_p[tok] > 0 and left_t[tok] > 0:
                hits += 1
                left_p[tok] -= 1
                left_t[tok] -= 1
    recall, precision = hits / m, hits / n
    return Score(precision, recall, fmeasure(precision, recall))


def _check_types(rouge_types: Sequence[str]) -> None:
    if isinstance(rouge_types, str) or not rouge_types:
        raise ValueError(f"rouge_types must be a non-empty list such as ['rouge1', 'rougeL'], got {rouge_types!r}")
    for t in rouge_types:
        if t not in ("rougeL", "rougeLsum") and not (isinstance(t, str) and _ROUGE_N.match(t)):
            raise ValueError(f"unknown rouge type {t!r}; use rougeN (rouge1, rouge2, ...), rougeL or rougeLsum")


def _sentences(text: str, use_stemmer: bool) -> list[list[str]]:
    # Newlines separate sentences; empty lines are dropped (a line of spaces stays, with no tokens).
    return [tokenize(s, use_stemmer) for s in text.split("\n") if s]


def rouge_pair(prediction: str, references: str | Sequence[str],
               rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
               use_stemmer: bool = False) -> dict[str, Score]:
    """Scores of one prediction against one reference, or the best-F reference per type among several."""
    _check_types(rouge_types)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references is empty: each prediction needs at least one reference")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"each reference must be a string, got {type(r).__name__}")
    # A text's tokens are its sentences' tokens joined: the newline is just another separator.
    p_sents = _sentences(prediction, use_stemmer)
    p_tokens = [tok for s in p_sents for tok in s]
    best: dict[str, Score] = {}
    for ref in refs:
        t_sents = _sentences(ref, use_stemmer)
        t_tokens = [tok for s in t_sents for tok in s]
        for kind in rouge_types:
            if kind == "rougeL":
                score = lcs_score(t_tokens, p_tokens)
            elif kind == "rougeLsum":
                score = summary_lcs_score(t_sents, p_sents)
            else:
                score = ngram_score(t_tokens, p_tokens, int(kind[5:]))
            if kind not in best or score.fmeasure > best[kind].fmeasure:  # first best wins, as np.argmax
                best[kind] = score
    return best


def rouge_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
                 use_stemmer: bool = False) -> list[dict[str, Score]]:
    """Per-example ROUGE: one dict {rouge_type: Score(precision, recall, fmeasure)} per prediction.

    references[i] is a string or a list of strings (several references: best F per type).
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per example); "
                        "for a single pair use rouge_pair(prediction, reference)")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: "
                         "pass one reference (or list of references) per prediction")
    return [rouge_pair(p, r, rouge_types, use_stemmer) for p, r in zip(predictions, references)]


def bootstrap_aggregate(scores: Sequence[dict[str, Score]], n_samples: int = 1000, confidence: float = 0.95,
                        seed: int | None = 0) -> dict[str, AggregateScore]:
    """Mean score with a bootstrap confidence interval per rouge type: {type: AggregateScore(low, mid, high)}.

    Resamples the examples with replacement n_samples times and takes percentiles of the resampled means.
    With the same seed this draws exactly what rouge-score's BootstrapAggregator draws after
    np.random.seed(seed), so the two agree; rouge-score itself never seeds, so its intervals vary run to run.
    """
    if not 0 <= confidence <= 1:
        raise ValueError(f"confidence={confidence} must be in [0, 1], e.g. 0.95")
    if n_samples <= 0:
        raise ValueError(f"n_samples={n_samples} must be positive")
    if not scores:
        raise ValueError("no scores to aggregate")
    rng = np.random.RandomState(seed)
    delta = (1 - confidence) / 2
    q = 100 * np.array([delta, 0.5, 1 - delta])
    out = {}
    for kind in scores[0]:
        matrix = np.vstack([tuple(s[kind]) for s in scores])
        means = np.zeros((n_samples, matrix.shape[1]))
        for k in range(n_samples):
            idx = rng.choice(np.arange(matrix.shape[0]), size=matrix.shape[0])
            means[k] = np.mean(matrix[idx, :], axis=0)
        low, mid, high = np.percentile(means, q, axis=0)
        out[kind] = AggregateScore(Score(*map(float, low)), Score(*map(float, mid)), Score(*map(float, high)))
    return out
