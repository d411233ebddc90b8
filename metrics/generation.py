"""Metrics of generated text that need no reference: diversity, repetition and copying of the training data.

    from metrics.generation import distinct_n, repetition_rate, self_bleu, NgramIndex
    distinct_n(continuations, 2)            # share of unique bigrams across all continuations (Li et al., 2016)
    repetition_rate(continuations, 4)       # share of 4-grams repeating an earlier one in the same text
    self_bleu(texts)                        # how alike the texts are to each other (Zhu et al., 2018)
    index = NgramIndex(train_ids, n=16)
    index.copy_stats(continuation_ids)      # share of continuations holding a 16-token span of training data

Sequences are lists of tokens (token ids or strings); a plain string is split on whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metrics.bleu import reference_info, score_from_stats, segment_stats
from metrics.bleu import tokenize as bleu_tokenize


def _tokens(seq) -> list:
    if isinstance(seq, str):
        return seq.split()
    if isinstance(seq, np.ndarray):
        return seq.tolist()
    if hasattr(seq, "tolist"):  # torch tensors
        return seq.tolist()
    return list(seq)


def _check_seqs(seqs, name: str = "sequences") -> list[list]:
    if isinstance(seqs, str) or not isinstance(seqs, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a list of token sequences (or strings), got {type(seqs).__name__}")
    return [_tokens(s) for s in seqs]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")


def ngrams(tokens: list, n: int) -> list[tuple]:
    return list(zip(*[tokens[i:] for i in range(n)]))


def distinct_n(seqs, n: int = 2) -> float:
    """Unique n-grams / all n-grams, pooled over every sequence; 0.0 when there are no n-grams.

    1.0 means no n-gram ever repeats; a model stuck in a loop scores near 0.
    """
    _check_n(n)
    grams = [g for toks in _check_seqs(seqs) for g in ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(seqs, n: int = 4) -> float:
    """Mean over sequences of the share of n-grams that repeat an earlier n-gram of the same sequence.

    This is seq-rep-n of Welleck et al. (2019): 1 - unique/total per sequence; sequences shorter than n skip.
    """
    _check_n(n)
    rates = []
    for toks in _check_seqs(seqs):
        grams = ngrams(toks, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def self_bleu(texts: Sequence[str], tokenize: str = "13a", max_ngram_order: int = 4) -> float:
    """Mean sentence BLEU (0-100) of each text against all the others as references.

    High self-BLEU means the samples resemble each other (low diversity). Uses exp smoothing and effective
    order, as sentence_bleu does.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError("texts must be a list of strings")
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a string")
    toks = [bleu_tokenize(t, tokenize) for t in texts]
    scores = []
    for i, hyp in enumerate(toks):
        refs = toks[:i] + toks[i + 1 :]
        ref_counts, ref_lens = reference_info(refs, max_ngram_order)
        s = segment_stats(hyp, ref_counts, ref_lens, max_ngram_order)
        k = max_ngram_order
        scores.append(score_from_stats(s[2 : 2 + k], s[2 + k :], s[0], s[1], "exp", None, True, k).score)
    return float(np.mean(scores))


def _hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-token window (arithmetic wraps modulo 2**64 on purpose)."""
    tokens = tokens.astype(np.uint64)
    h = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    base = np.uint64(1_000_003)
    for j in range(n):
        h = h * base + tokens[j : j + len(h)]
    return h


class NgramIndex:
    """Every n-token window of a token stream, sorted by hash, for exact "was this span in the data?" lookups.

    Memory: 16 bytes per training token. Hash matches are confirmed against the tokens, so collisions
    cannot produce false positives.
    """

    def __init__(self, token_ids, n: int = 16):
        _check_n(n)
        self.n = n
        self.tokens = np.asarray(token_ids)
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise TypeError("token_ids must be a flat array of integer token ids")
        if len(self.tokens) < n:
            raise ValueError(f"the stream holds {len(self.tokens)} tokens, fewer than n={n}")
        hashes = _hashes(self.tokens, n)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def contains(self, span: Sequence[int]) -> bool:
        """True if these n tokens occur somewhere in the indexed stream."""
        span = np.asarray(span, dtype=np.int64)
        if len(span) != self.n:
            raise ValueError(f"span has {len(span)} tokens; this index holds {self.n}-grams")
        h = _hashes(span, self.n)[0]
        lo, hi = np.searchsorted(self.sorted, h, "left"), np.searchsorted(self.sorted, h, "right")
        return any(np.array_equal(self.tokens[p : p + self.n], span) for p in self.order[lo:hi])

    def copy_stats(self, seqs) -> dict:
        """How much of each sequence is a verbatim copy of indexed n-grams.

        copy_rate: share of sequences with at least one indexed n-gram; ngram_overlap: share of all their
        n-grams that are indexed; copied: per-sequence flags.
        """
        flags, hits, total = [], 0, 0
        for toks in _check_seqs(seqs):
            found = [self.contains(toks[i : i + self.n]) for i in range(len(toks) - self.n + 1)]
            flags.append(any(found))
            hits += sum(found)
            total += len(found)
        return {"n": self.n, "copy_rate": float(np.mean(flags)) if flags else 0.0,
                "ngram_overlap": hits / total if total else 0.0, "copied": flags}


def distinct_counts(seqs, max_n: int = 4) -> dict[str, float]:
    """distinct-1..max_n in one dict, e.g. {"distinct_1": 0.61, "distinct_2": 0.93, ...}."""
    return {f"distinct_{n}": distinct_n(seqs, n) for n in range(1, max_n + 1)}

