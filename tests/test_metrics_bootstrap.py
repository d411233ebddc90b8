"""metrics.bootstrap: intervals cover the true value at the stated rate, in simulation."""

from __future__ import annotations

import numpy as np
import pytest

from metrics.bootstrap import bootstrap_corpus, bootstrap_mean


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_mean_interval_covers_the_true_mean_at_the_stated_rate(confidence):
    # 400 experiments of 200 examples from a skewed 0/1-heavy distribution (like exact match and ast validity).
    rng = np.random.default_rng(1)
    p, trials = 0.3, 400
    covered = 0
    for t in range(trials):
        x = (rng.random(200) < p).astype(float)
        ci = bootstrap_mean(x, n_samples=500, confidence=confidence, seed=t)
        assert ci["low"] <= ci["value"] <= ci["high"] and ci["n"] == 200
        covered += ci["low"] <= p <= ci["high"]
    # Binomial standard error of the coverage estimate is ~1.1% (95%) / 2% (80%); allow about 3 of them.
    assert abs(covered / trials - confidence) < 3.5 * np.sqrt(confidence * (1 - confidence) / trials) + 0.01


def test_corpus_interval_covers_a_ratio_of_sums():
    # A corpus score is a ratio of summed statistics (like BLEU precision): matches / totals.
    rng = np.random.default_rng(2)
    true_ratio, trials, covered = 0.4, 300, 0
    for t in range(trials):
        totals = rng.integers(1, 30, size=150)
        matches = rng.binomial(totals, true_ratio)
        ci = bootstrap_corpus(np.stack([matches, totals], 1), lambda s: s[0] / s[1], n_samples=400, seed=t)
        assert ci["value"] == pytest.approx(matches.sum() / totals.sum())
        covered += ci["low"] <= true_ratio <= ci["high"]
    assert abs(covered / trials - 0.95) < 0.045


def test_same_seed_same_interval_and_clear_errors():
    x = np.arange(50.0)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) != bootstrap_mean(x, seed=4)
    with pytest.raises(ValueError, match="no examples"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean(x, confidence=95)
