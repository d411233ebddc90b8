"""Percentile bootstrap confidence intervals for per-example scores and corpus scores, i.i.d. or by cluster.

    from metrics.bootstrap import bootstrap_mean, bootstrap_corpus, bootstrap_difference
    bootstrap_mean(exact_match_per_example)                    # {"value", "low", "high", "n", "confidence"}
    bootstrap_mean(exact_match_per_example, clusters=doc_ids)  # resample documents, keep all their examples
    bootstrap_corpus(stats_per_example, score_fn)              # e.g. corpus BLEU from summed n-gram statistics
    bootstrap_difference(stats_a, stats_b, score_fn, clusters=doc_ids)  # paired: system a minus system b

Resample B times with replacement, recompute the statistic each time, and report the (1 - confidence) / 2 and
(1 + confidence) / 2 percentiles of the B values (Efron's percentile interval). The interval is about the
sample: what the score would be on another draw like this one.

Without clusters the examples are drawn independently. Examples taken from the same document are not
independent (one file's functions share names, style and difficulty), so when they come in clusters the
cluster bootstrap draws whole clusters with replacement, as many as there are, and keeps every example of a
drawn cluster (Davison & Hinkley 1997, sec. 3.8): a resample then holds a varying number of examples, and the
interval reflects how much the score moves from one set of documents to another. With one example per cluster
it is the i.i.d. bootstrap, draw for draw.

A corpus score (BLEU, chrF) is not a mean of per-example scores, so bootstrap_corpus resamples the examples'
statistics and recomputes the corpus score from their weighted sums; a mean is the corpus score
sum(x) / count. bootstrap_difference resamples the same clusters for both systems (a paired bootstrap), which
is what says whether one system beats another on these prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _check(n: int, n_samples: int, confidence: float) -> None:
    if n == 0:
        raise ValueError("no examples to bootstrap")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} must be a positive integer (1000 is usual)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1, e.g. 0.95")


def resample_indices(n: int, n_samples: int, seed: int | None) -> np.ndarray:
    """(n_samples, n) indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(n_samples, n))


def resample_weights(n: int, n_samples: int, seed: int | None, clusters: Sequence | None = None) -> np.ndarray:
    """(n_samples, n): how many times each example is in each resample.

    clusters=None draws examples independently; otherwise clusters[i] is example i's cluster id (any hashable
    sortable value, e.g. a document index) and whole clusters are drawn: every example of a cluster drawn k times
    gets weight k. Cluster ids are numbered in sorted order, so singleton clusters 0..n-1 reproduce the i.i.d. draws.
    """
    if clusters is None:
        ids, k = np.arange(n), n
    else:
        if len(clusters) != n:
            raise ValueError(f"{len(clusters)} cluster ids for {n} examples: pass one cluster id per example")
        _, ids = np.unique(np.asarray(clusters), return_inverse=True)
        ids, k = ids.reshape(-1), int(ids.max()) + 1
    draws = resample_indices(k, n_samples, seed)
    flat = (draws + k * np.arange(n_samples)[:, None]).ravel()
    per_cluster = np.bincount(flat, minlength=n_samples * k).reshape(n_samples, k).astype(np.float64)
    return per_cluster[:, ids]


def _interval(value: float, samples: np.ndarray, n: int, confidence: float, clusters: Sequence | None) -> dict:
    low, high = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    out = {"value": float(value), "low": float(low), "high": float(high), "n": n, "confidence": confidence}
    if clusters is not None:
        out["clusters"] = len(set(clusters))
    return out


def _mean_stats(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be a flat list of per-example scores, got shape {x.shape}")
    return np.stack([x, np.ones_like(x)], axis=1)


def _ratio(s: np.ndarray) -> float:
    return s[0] / s[1]


def _stats(stats: Sequence[Sequence[float]]) -> np.ndarray:
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"stats must be one row of statistics per example, got shape {s.shape}")
    return s


def bootstrap_mean(values: Sequence[float], n_samples: int = 1000, confidence: float = 0.95,
                   seed: int | None = 0, clusters: Sequence | None = None) -> dict:
    """The mean of values and its percentile-bootstrap interval (over clusters when clusters are given)."""
    return bootstrap_corpus(_mean_stats(values), _ratio, n_samples, confidence, seed, clusters)


def bootstrap_corpus(stats: Sequence[Sequence[float]], score_fn: Callable[[np.ndarray], float],
                     n_samples: int = 1000, confidence: float = 0.95, seed: int | None = 0,
                     clusters: Sequence | None = None) -> dict:
    """score_fn(summed stats) on all examples, and its percentile-bootstrap interval over examples or clusters."""
    s = _stats(stats)
    _check(len(s), n_samples, confidence)
    # A weight matrix avoids materialising (n_samples, n, k) copies of the statistics.
    sums = resample_weights(len(s), n_samples, seed, clusters) @ s
    scores = np.array([score_fn(row) for row in sums])
    return _interval(score_fn(s.sum(axis=0)), scores, len(s), confidence, clusters)


def bootstrap_difference(stats_a: Sequence[Sequence[float]] | Sequence[float],
                         stats_b: Sequence[Sequence[float]] | Sequence[float],
                         score_fn: Callable[[np.ndarray], float] | None = None, n_samples: int = 1000,
                         confidence: float = 0.95, seed: int | None = 0, clusters: Sequence | None = None) -> dict:
    """score(a) - score(b) on the same examples, with a paired percentile-bootstrap interval.

    stats_a[i] and stats_b[i] belong to the same example i; each resample weights both systems' rows alike.
    score_fn=None compares means: stats_a and stats_b are then flat lists of per-example scores.
    """
    if score_fn is None:
        a, b, score_fn = _mean_stats(stats_a), _mean_stats(stats_b), _ratio
    else:
        a, b = _stats(stats_a), _stats(stats_b)
    if a.shape != b.shape:
        raise ValueError(f"stats_a {a.shape} and stats_b {b.shape} differ: pass both systems' rows for the same "
                         "examples, in the same order")
    _check(len(a), n_samples, confidence)
    w = resample_weights(len(a), n_samples, seed, clusters)
    diffs = np.array([score_fn(x) - score_fn(y) for x, y in zip(w @ a, w @ b)])
    return _interval(score_fn(a.sum(axis=0)) - score_fn(b.sum(axis=0)), diffs, len(a), confidence, clusters)
