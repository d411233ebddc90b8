"""metrics.bootstrap: intervals cover the true value at the stated rate, in simulation."""

from __future__ import annotations

import numpy as np
import pytest

from metrics.bootstrap import (
    bootstrap_corpus,
    bootstrap_difference,
    bootstrap_mean,
    resample_indices,
    resample_weights,
)


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


# ---------------------------------------------------------------------------------------------------------------
# The cluster bootstrap: resample documents, keep all their examples.


def clustered_scores(rng, n_clusters: int, size, spread: float = 0.2):
    """Scores with a strong per-cluster effect (a document easy or hard as a whole); true mean 0.5."""
    sizes = [size] * n_clusters if isinstance(size, int) else list(size)
    effects = rng.normal(0, spread, n_clusters)
    x = np.concatenate([0.5 + e + rng.normal(0, 0.05, s) for e, s in zip(effects, sizes)])
    clusters = np.repeat(np.arange(n_clusters), sizes)
    return x, clusters


def test_one_example_per_cluster_is_the_iid_bootstrap():
    rng = np.random.default_rng(5)
    x = rng.random(120)
    stats = np.stack([rng.integers(0, 5, 120), rng.integers(5, 9, 120)], 1)
    # Singleton clusters numbered in order: the same draws, so the same interval exactly.
    assert bootstrap_mean(x, 300, seed=7, clusters=list(range(120))) == {**bootstrap_mean(x, 300, seed=7),
                                                                         "clusters": 120}
    ratio = lambda s: s[0] / s[1]
    a = bootstrap_corpus(stats, ratio, 300, seed=7, clusters=np.arange(120))
    b = bootstrap_corpus(stats, ratio, 300, seed=7)
    assert (a["low"], a["high"], a["value"]) == (b["low"], b["high"], b["value"])
    # Singleton clusters with arbitrary ids: other draws from the same distribution, so a close interval.
    ids = [f"doc{j}" for j in rng.permutation(120)]
    c, d = bootstrap_mean(x, 4000, seed=1, clusters=ids), bootstrap_mean(x, 4000, seed=2)
    width = d["high"] - d["low"]
    assert abs(c["low"] - d["low"]) < 0.05 * width and abs(c["high"] - d["high"]) < 0.05 * width


def test_clustered_data_gives_a_wider_interval_that_keeps_its_coverage():
    rng = np.random.default_rng(6)
    trials, covered_cluster, covered_iid, ratios = 200, 0, 0, []
    for t in range(trials):
        x, clusters = clustered_scores(rng, 30, 10)
        cl = bootstrap_mean(x, 400, seed=t, clusters=clusters)
        iid = bootstrap_mean(x, 400, seed=t)
        assert cl["value"] == pytest.approx(iid["value"]) and cl["clusters"] == 30 and cl["n"] == 300
        ratios.append((cl["high"] - cl["low"]) / (iid["high"] - iid["low"]))
        covered_cluster += cl["low"] <= 0.5 <= cl["high"]
        covered_iid += iid["low"] <= 0.5 <= iid["high"]
    # Within-cluster noise is 4x smaller than the cluster effect: 10 examples of a cluster say little more than one.
    assert np.median(ratios) > 2.5
    # The percentile interval over 30 clusters covers a little under 95%; the i.i.d. one misses most of the time.
    assert covered_cluster / trials > 0.88 and covered_iid / trials < 0.6


def test_clusters_of_unequal_size_weight_every_example_of_a_drawn_cluster():
    x = np.array([1.0, 0.0, 0.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    clusters = [2, 7, 7, 3, 9, 9, 9, 9]  # sizes 1, 2, 1, 4; ids unsorted and not contiguous
    w = resample_weights(len(x), 500, 3, clusters)
    draws = resample_indices(4, 500, 3)  # clusters numbered in sorted order: 2 -> 0, 3 -> 1, 7 -> 2, 9 -> 3
    members = {0: [0], 1: [3], 2: [1, 2], 3: [4, 5, 6, 7]}
    for row, drawn in zip(w, draws):
        expected = np.zeros(len(x))
        for c in drawn:
            expected[members[c]] += 1
        assert np.array_equal(row, expected)
    # Each replicate is a ratio: the drawn clusters' score sums over their example counts.
    ci = bootstrap_mean(x, 500, seed=3, clusters=clusters)
    means = np.array([sum(x[members[c]].sum() for c in d) / sum(len(members[c]) for c in d) for d in draws])
    low, high = np.percentile(means, [2.5, 97.5])
    assert (ci["low"], ci["high"]) == pytest.approx((low, high)) and ci["value"] == pytest.approx(x.mean())
    rng = np.random.default_rng(8)
    x, clusters = clustered_scores(rng, 25, rng.integers(1, 40, 25))
    ci = bootstrap_mean(x, 500, seed=0, clusters=clusters)
    assert ci["low"] < ci["value"] < ci["high"] and ci["clusters"] == 25


def test_cluster_bootstrap_is_deterministic_given_a_seed():
    x, clusters = clustered_scores(np.random.default_rng(9), 12, 5)
    assert bootstrap_mean(x, seed=4, clusters=clusters) == bootstrap_mean(x, seed=4, clusters=clusters)
    assert bootstrap_mean(x, seed=4, clusters=clusters) != bootstrap_mean(x, seed=5, clusters=clusters)
    with pytest.raises(ValueError, match="one cluster id per example"):
        bootstrap_mean(x, clusters=clusters[:-1])


def test_paired_difference_resamples_both_systems_alike():
    rng = np.random.default_rng(10)
    b, clusters = clustered_scores(rng, 20, 8)
    a = b + 0.03  # the same examples, uniformly better: every paired replicate sees exactly +0.03
    d = bootstrap_difference(a, b, clusters=clusters)
    assert d["value"] == pytest.approx(0.03) and d["high"] - d["low"] < 1e-9
    # Unpaired intervals of the two means overlap heavily although the difference is certain.
    ia, ib = bootstrap_mean(a, clusters=clusters), bootstrap_mean(b, clusters=clusters)
    assert ia["low"] < ib["high"]
    # A corpus score: difference of two ratios of sums, resampled by cluster.
    sa = np.stack([rng.integers(0, 5, len(b)), np.full(len(b), 10)], 1)
    sb = np.stack([rng.integers(0, 5, len(b)), np.full(len(b), 10)], 1)
    ratio = lambda s: s[0] / s[1]
    d = bootstrap_difference(sa, sb, ratio, clusters=clusters)
    assert d["value"] == pytest.approx(sa[:, 0].sum() / sa[:, 1].sum() - sb[:, 0].sum() / sb[:, 1].sum())
    assert d["low"] <= d["value"] <= d["high"] and d["clusters"] == 20
    with pytest.raises(ValueError, match="same examples"):
        bootstrap_difference(a, b[:-1])
