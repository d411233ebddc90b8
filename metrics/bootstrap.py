"""Percentile bootstrap confidence intervals for per-example scores and for corpus-level scores.

    from metrics.bootstrap import bootstrap_mean, bootstrap_corpus
    bootstrap_mean(exact_match_per_example)                    # {"value", "low", "high", "n", "confidence"}
    bootstrap_corpus(stats_per_example, score_fn)              # e.g. corpus BLEU from summed n-gram statistics

Resample the examples with replacement B times, recompute the statistic each time, and report the
(1 - confidence) / 2 and (1 + confidence) / 2 percentiles of the B values (Efron's percentile interval).
The interval is about the prompts: what the score would be on another draw of prompts like these.
A corpus score (BLEU, chrF) is not a mean of per-example scores, so bootstrap_corpus resamples the
examples' statistics and recomputes the corpus score from their sums.
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


def bootstrap_mean(values: Sequence[float], n_samples: int = 1000, confidence: float = 0.95,
                   seed: int | None = 0) -> dict:
    """The mean of values and its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be a flat list of per-example scores, got shape {x.shape}")
    _check(len(x), n_samples, confidence)
    means = x[resample_indices(len(x), n_samples, seed)].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {"value": float(x.mean()), "low": float(low), "high": float(high), "n": len(x),
            "confidence": confidence}


def bootstrap_corpus(stats: Sequence[Sequence[float]], score_fn: Callable[[np.ndarray], float],
                     n_samples: int = 1000, confidence: float = 0.95, seed: int | None = 0) -> dict:
    """score_fn(summed stats) on all examples, and its percentile-bootstrap interval over examples."""
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"stats must be one row of statistics per example, got shape {s.shape}")
    _check(len(s), n_samples, confidence)
    idx = resample_indices(len(s), n_samples, seed)
    # Summing through a count matrix avoids materialising (n_samples, n, k) copies of the statistics.
    counts = np.zeros((n_samples, len(s)))
    np.add.at(counts, (np.arange(n_samples)[:, None], idx), 1)
    scores = np.array([score_fn(row) for row in counts @ s])
    low, high = np.percentile(scores, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {"value": float(score_fn(s.sum(axis=0))), "low": float(low), "high": float(high), "n": len(s),
            "confidence": confidence}
