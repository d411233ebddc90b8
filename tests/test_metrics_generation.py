"""Generation metrics: distinct-n, repetition, self-BLEU (against sacrebleu) and verbatim-copy detection."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu

from metrics.generation import NgramIndex, distinct_counts, distinct_n, repetition_rate, self_bleu


def test_distinct_n_by_hand():
    seqs = ["a b a b", "a b c"]
    # bigrams: ab ba ab | ab bc -> 5 total, unique {ab, ba, bc} = 3
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert distinct_n([[1, 2, 3]], 4) == 0.0  # no 4-grams at all
    assert distinct_counts([[1, 2, 3, 4]], 2) == {"distinct_1": 1.0, "distinct_2": 1.0}


def test_repetition_rate_by_hand():
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 unique of 5 -> 3/5 repeat; "x y z" -> 0
    assert repetition_rate(["a b a b a b", "x y z"], 2) == pytest.approx((3 / 5 + 0) / 2)
    assert repetition_rate([[7, 7, 7, 7]], 1) == pytest.approx(3 / 4)


def test_self_bleu_equals_sacrebleu_sentence_bleu_against_the_others():
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat log , . !".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))) for _ in range(12)]
    expected = np.mean([sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)])
    assert self_bleu(texts) == pytest.approx(expected, abs=1e-9)
    assert self_bleu(["same words here", "same words here"]) == pytest.approx(100.0)


def test_ngram_index_finds_exact_copies_only():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50, 5000).astype(np.uint16)
    index = NgramIndex(train, n=8)
    copied = train[1234:1260].tolist()  # 26 tokens taken verbatim from training data
    fresh = rng.integers(0, 50, 26).tolist()
    stats = index.copy_stats([copied, fresh, copied[:5]])
    assert stats["copied"] == [True, False, False]
    assert stats["copy_rate"] == pytest.approx(1 / 3)
    # brute force: every 8-gram of the fresh sequence checked against all training windows
    windows = {tuple(train[i : i + 8].tolist()) for i in range(len(train) - 7)}
    for i in range(len(fresh) - 7):
        assert index.contains(fresh[i : i + 8]) == (tuple(fresh[i : i + 8]) in windows)
    assert stats["ngram_overlap"] == pytest.approx((19 + sum(tuple(fresh[i : i + 8]) in windows
                                                             for i in range(19))) / 38)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="at least 2 texts"):
        self_bleu(["only one"])
    with pytest.raises(TypeError, match="list of token sequences"):
        distinct_n("a b c", 1)
    with pytest.raises(ValueError, match="n=0"):
        repetition_rate(["a b"], 0)
    with pytest.raises(ValueError, match="fewer than n=16"):
        NgramIndex([1, 2, 3], n=16)
    with pytest.raises(ValueError, match="span has 2 tokens"):
        NgramIndex(list(range(20)), n=4).contains([1, 2])


def test_bench_runs_small_and_reports_identical_results():
    from metrics.bench import bench_bleu, bench_rouge

    assert bench_bleu(300)["same"] and bench_rouge(40)["same"]
