"""metrics.kneser_ney: normalised distributions, equality with a brute-force reading of the formulas, speed-free."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from metrics.kneser_ney import KneserNey


def brute_force_kn(stream: list[int], vocab: int, order: int):
    """P(w | history) straight from the definitions, with dicts of tuples (tiny data only)."""
    grams = {n: Counter(tuple(stream[i : i + n]) for i in range(len(stream) - n + 1)) for n in range(1, order + 2)}

    def count(g: tuple) -> int:
        n = len(g)
        if n == order:
            return grams[n][g]
        return len({big[0] for big in grams[n + 1] if big[1:] == g})  # distinct left neighbours

    def discount(n: int) -> float:
        values = [count(g) for g in grams[n]]
        n1, n2 = values.count(1), values.count(2)
        return 0.5 if n1 == 0 else min(max(n1 / (n1 + 2 * n2), 1e-3), 0.999)

    disc = {n: discount(n) for n in range(1, order + 1)}

    def prob(w: int, h: tuple) -> float:
        n = len(h) + 1
        d = disc[n]
        if n == 1:
            c = [count((v,)) for v in range(vocab)]
            return (max(c[w] - d, 0) + d * sum(x > 0 for x in c) / vocab) / sum(c)
        c = [count(h + (v,)) for v in range(vocab)]
        total = sum(c)
        if total == 0:
            return prob(w, h[1:])
        return (max(c[w] - d, 0) + d * sum(x > 0 for x in c) * prob(w, h[1:])) / total

    def dist(context: list[int]) -> np.ndarray:
        h = tuple(context[max(0, len(context) - order + 1) :]) if order > 1 else ()
        return np.array([prob(w, h) for w in range(vocab)])

    return dist


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_equals_brute_force_on_tiny_data(order):
    rng = np.random.default_rng(order)
    vocab = 7
    # A skewed source with repeats, so that every order has seen and unseen histories.
    stream = list(rng.choice(vocab - 1, size=120, p=[0.35, 0.25, 0.15, 0.1, 0.1, 0.05]))
    stream += stream[10:30]
    lm = KneserNey(stream, vocab, order=order)
    ref = brute_force_kn(stream, vocab, order)
    for trial in range(25):
        ctx = list(rng.integers(0, vocab, size=int(rng.integers(0, 6))))
        if trial % 3 == 0:  # a history that occurred in training
            i = int(rng.integers(0, len(stream) - 6))
            ctx = stream[i : i + int(rng.integers(1, 6))]
        np.testing.assert_allclose(lm.next_probs(ctx), ref(ctx), rtol=1e-12, atol=1e-15)
    # token_logprobs scores each position with the history it has, the same distributions
    ev = list(rng.integers(0, vocab, size=15)) + stream[40:55]
    want = [np.log(ref(ev[:t])[ev[t]]) for t in range(1, len(ev))]
    np.testing.assert_allclose(lm.token_logprobs(ev), want, rtol=1e-12)


@pytest.mark.parametrize("order", [3, 5])
def test_distributions_sum_to_one_for_random_contexts(order):
    rng = np.random.default_rng(0)
    vocab = 300
    # Zipf-like tokens with copied stretches, like code: many histories are seen several times.
    base = np.minimum(rng.zipf(1.3, size=20_000), vocab) - 1
    train = np.concatenate([base, base[5000:9000], base[:3000]])
    lm = KneserNey(train, vocab, order=order)
    for _ in range(50):
        k = int(rng.integers(0, 8))
        if rng.random() < 0.5:
            i = int(rng.integers(0, len(train) - k))
            ctx = train[i : i + k]
        else:
            ctx = rng.integers(0, vocab, size=k)
        p = lm.next_probs(ctx)
        assert p.shape == (vocab,) and (p > 0).all()
        assert abs(p.sum() - 1) < 1e-9
    # the vectorised scorer agrees with next_probs on a held-out stream
    ev = np.minimum(rng.zipf(1.3, size=300), vocab) - 1
    lp = lm.token_logprobs(ev)
    ref = [np.log(lm.next_probs(ev[:t])[ev[t]]) for t in range(1, len(ev))]
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    # more context helps on text like the training text
    held = base[9000:12000]
    assert lm.perplexity(held).nll < KneserNey(train, vocab, order=1).perplexity(held).nll


def test_greedy_follows_the_most_likely_path_and_errors_are_clear():
    lm = KneserNey([0, 1, 2, 3] * 20, 5, order=3)
    assert lm.greedy([0, 1], 5) == [2, 3, 0, 1, 2]
    assert lm.greedy([0, 1], 5, eos_id=3) == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        KneserNey([0, 9], 5, order=1)
    with pytest.raises(ValueError, match="order"):
        KneserNey([0, 1, 2], 5, order=0)
    with pytest.raises(ValueError, match="needs at least"):
        KneserNey([0, 1], 5, order=3)
