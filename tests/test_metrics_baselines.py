"""metrics.baselines' greedy tables against a dense count matrix."""

from __future__ import annotations

import numpy as np

from metrics.baselines import greedy_next_tables


def test_greedy_tables_equal_dense_argmax():
    rng = np.random.default_rng(0)
    for vocab in (5, 40):
        train = rng.integers(0, vocab - 1, size=400)  # the last id never occurs: its row falls back to id 0
        uni, best = greedy_next_tables(train, vocab)
        dense = np.zeros((vocab, vocab), dtype=int)
        np.add.at(dense, (train[:-1], train[1:]), 1)
        assert uni == np.bincount(train, minlength=vocab).argmax()
        np.testing.assert_array_equal(best, dense.argmax(1))
