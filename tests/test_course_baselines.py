"""The day-12 checks (course/check/baselines.py) pass the solutions, fail planted bugs (one test each), and count
the package's own bigram and bootstrap as the reference."""

from __future__ import annotations

import numpy as np
import pytest

from course import check
from course import solutions as sol
from course.check import baselines


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def ok(r) -> bool:
    return bool(r) and not r.uses_reference


def _dense_loss(train, ids, v, k):
    """Add-k bigram loss from a dense V x V count table: independent of metrics.baselines."""
    c = np.zeros((v, v))
    np.add.at(c, (train[:-1], train[1:]), 1)
    p = (c + k) / (c.sum(1, keepdims=True) + k * v)
    return float(-np.log(p[ids[:-1], ids[1:]]).mean())


def test_the_bigram_reference_equals_a_dense_count_table():
    rng = np.random.default_rng(3)
    for trial in range(4):
        train, held, ev, v, ks = baselines._addk_inputs(rng, trial)
        best, loss = baselines._addk_ref(train, held, ev, v, ks)
        dense = [_dense_loss(train, held, v, k) for k in ks]
        assert best == ks[int(np.argmin(dense))]
        assert loss == pytest.approx(_dense_loss(train, ev, v, best), abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_addk_solution_passes(seed):
    assert ok(check.addk_bigram(sol.my_addk_bigram, seed=seed))


def test_addk_inputs_always_have_a_held_out_pair():
    # Seeds whose draws once cut a one-token held-out split: the reference divided by zero pairs.
    for s in (52, 79, 107, 161):
        rng = np.random.default_rng(s)
        for trial in range(5):
            _, held, ev, _, _ = baselines._addk_inputs(rng, trial)
            assert len(held) >= 20 and len(ev) >= 2


def test_addk_k_fitted_on_eval_fails():
    def on_eval(train, held, ev, v, ks):
        return sol.my_addk_bigram(train, ev, ev, v, ks)

    r = check.addk_bigram(on_eval, seed=5)
    assert not r and "eval loss" in r.message


def test_addk_denominator_without_kv_fails():
    def no_kv(train, held, ev, v, ks):
        pairs = {}
        for a, b in zip(train[:-1], train[1:]):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
        ctx = np.bincount(train[:-1], minlength=v)

        def loss(ids, k):
            return -np.mean([np.log((pairs.get((a, b), 0) + k) / (ctx[a] + k)) for a, b in zip(ids[:-1], ids[1:])])

        held_losses = [loss(held, k) for k in ks]
        best = ks[int(np.argmin(held_losses))]
        return best, loss(ev, best)

    r = check.addk_bigram(no_kv, seed=6)
    assert not r and "k * V" in r.message


def test_addk_pair_across_the_split_boundary_fails():
    def spanning(train, held, ev, v, ks):
        best, _ = sol.my_addk_bigram(train, np.r_[train[-1:], held], ev, v, ks)
        return best, sol.my_addk_bigram(train, held, np.r_[held[-1:], ev], v, [best])[1]

    r = check.addk_bigram(spanning, seed=7)
    assert not r and "inside each split" in r.message


def test_addk_package_bigram_counts_as_the_reference():
    from metrics.baselines import bigram_perplexity

    def via_package(train, held, ev, v, ks):
        losses = [bigram_perplexity(train, held, v, k=k).nll for k in ks]
        best = ks[int(np.argmin(losses))]
        return best, bigram_perplexity(train, ev, v, k=best).nll

    r = check.addk_bigram(via_package, seed=8)
    assert r and r.uses_reference
    r = check.addk_bigram(check.reference("addk_bigram"), seed=8)
    assert r and r.uses_reference


@pytest.mark.parametrize("seed", range(8))
def test_bootstrap_solution_passes(seed):
    assert ok(check.bootstrap_ci(sol.my_bootstrap_ci, seed=seed))


def test_bootstrap_resampling_examples_fails():
    def examples(values, clusters, n, seed, alpha):
        return sol.my_bootstrap_ci(values, list(range(len(values))), n, seed, alpha)

    r = check.bootstrap_ci(examples, seed=11)
    assert not r and "not examples" in r.message


def test_bootstrap_without_replacement_fails():
    def no_replacement(values, clusters, n, seed, alpha):
        x, c = np.asarray(values), np.asarray(clusters)
        names = np.unique(c)
        rng = np.random.default_rng(seed)
        means = [np.concatenate([x[c == names[i]] for i in rng.permutation(len(names))]).mean() for _ in range(n)]
        return tuple(np.percentile(means, [50 * alpha, 100 - 50 * alpha]))

    r = check.bootstrap_ci(no_replacement, seed=12)
    assert not r and "WITH replacement" in r.message


def test_bootstrap_package_counts_as_the_reference():
    from metrics.bootstrap import bootstrap_mean

    def via_package(values, clusters, n, seed, alpha):
        r = bootstrap_mean(values, n, 1 - alpha, seed, clusters)
        return r["low"], r["high"]

    r = check.bootstrap_ci(via_package, seed=13)
    assert r and r.uses_reference
    r = check.bootstrap_ci(check.reference("bootstrap_ci"), seed=13)
    assert r and r.uses_reference
