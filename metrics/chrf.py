"""chrF (Popović, 2015) from scratch, computed the way sacrebleu 2.x computes it (character n-grams only).

    from metrics.chrf import corpus_chrf, sentence_chrf
    corpus_chrf(hyps, refs).score          # one reference per hypothesis; 0-100
    chrf_stats(hyp, ref)                   # the per-segment statistics corpus_chrf sums (for bootstrapping)

For n = 1..6 it counts character n-grams of hypothesis and reference (whitespace removed unless
whitespace=True), and the matches (the clipped overlap). Corpus chrF sums [hyp, ref, match] per order over
segments, then: precision and recall per order, averaged over the orders where both sides have n-grams, and
F-beta of the averages with beta = 2 (recall counts twice as much as precision).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

CHAR_ORDER = 6
BETA = 2


def char_ngrams(text: str, order: int, whitespace: bool = False) -> list[Counter]:
    """Counters of the character n-grams of text for n = 1..order (spaces, tabs, newlines dropped first)."""
    if not whitespace:
        text = "".join(text.split())
    return [Counter(text[i : i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def chrf_stats(hypothesis: str, reference: str, char_order: int = CHAR_ORDER, lowercase: bool = False,
               whitespace: bool = False) -> list[int]:
    """[hyp_count, ref_count, match_count] for each order, flattened (3 * char_order integers)."""
    if lowercase:
        hypothesis, reference = hypothesis.lower(), reference.lower()
    stats = []
    for h, r in zip(char_ngrams(hypothesis, char_order, whitespace), char_ngrams(reference, char_order, whitespace)):
        match = sum(min(c, r[g]) for g, c in h.items() if g in r)
        # As sacrebleu: an order with no reference n-grams counts no hypothesis n-grams either.
        stats += [sum(h.values()) if r else 0, sum(r.values()), match]
    return stats


def chrf_from_stats(stats: Sequence[float], beta: float = BETA) -> float:
    """chrF (0-100) from summed statistics."""
    factor = beta**2
    prec_sum = rec_sum = 0.0
    orders = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        if n_hyp > 0 and n_ref > 0:
            prec_sum += n_match / n_hyp
            rec_sum += n_match / n_ref
            orders += 1
    if orders == 0:
        return 0.0
    p, r = prec_sum / orders, rec_sum / orders
    return 100 * (1 + factor) * p * r / (factor * p + r) if p + r > 0 else 0.0


@dataclass
class CHRFScore:
    score: float
    char_order: int
    beta: float
    signature: str


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists of strings (one reference per hypothesis); "
                        "for one pair use sentence_chrf(hyp, ref)")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: pass one each")
    if not hypotheses:
        raise ValueError("no segments: chrF needs at least one hypothesis")
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] is a {type(s).__name__}, not a string")


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = CHAR_ORDER,
                beta: float = BETA, lowercase: bool = False, whitespace: bool = False) -> CHRFScore:
    """Corpus chrF of hypotheses against one reference each; equals sacrebleu's CHRF with word_order=0.

    Note the argument shape: references is a flat list here (sacrebleu takes [references]).
    """
    _check(hypotheses, references)
    if not isinstance(char_order, int) or char_order < 1:
        raise ValueError(f"char_order={char_order!r} must be a positive integer (chrF uses 6)")
    total = [0] * (3 * char_order)
    for h, r in zip(hypotheses, references):
        for i, v in enumerate(chrf_stats(h, r, char_order, lowercase, whitespace)):
            total[i] += v
    sig = (f"nrefs:1|case:{'lc' if lowercase else 'mixed'}|eff:yes|nc:{char_order}|nw:0|space:"
           f"{'yes' if whitespace else 'no'}")
    return CHRFScore(chrf_from_stats(total, beta), char_order, beta, sig)


def sentence_chrf(hypothesis: str, reference: str, **kwargs) -> float:
    """chrF of one pair (0-100)."""
    return corpus_chrf([hypothesis], [reference], **kwargs).score
