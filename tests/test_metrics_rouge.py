"""ROUGE: hand-computed cases, the bit-parallel LCS against the textbook table, and exact agreement with
rouge-score on every per-example score of hundreds of random pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from metrics.rouge import (
    bootstrap_aggregate,
    lcs_indices,
    lcs_rows,
    rouge_pair,
    rouge_scores,
    summary_lcs_score,
    tokenize,
)

TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]
WORDS = ["the", "The", "cat", "CAT", "sat", "running", "runs", "ran", "on", "mat", "3.14", "1,000", "end.",
         "café", "naïve", "Über", "İstanbul", "x-ray", "dogs,", "a", "happily", "generalization", "connected",
         "connection", "日本語", "😀", "...", "it's", "U.S.A.", "studies", "agreed", "ponies", "K", "2024"]


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 4, 8, 15, 25])
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    text = "".join("\n" if c == " " and rng.random() < 0.15 else c for c in text)  # sentences for rougeLsum
    if rng.random() < 0.1:
        text = "\n\n" + text + "\n \n"
    return text


def table(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t


def test_hand_computed_rouge_n_and_l():
    s = rouge_pair("the cat ate the fish", "the cat sat on the mat", ["rouge1", "rouge2", "rougeL"])
    # unigrams: the x2, cat -> 3 matches; prediction 5, reference 6 words
    assert s["rouge1"].precision == pytest.approx(3 / 5) and s["rouge1"].recall == pytest.approx(3 / 6)
    assert s["rouge1"].fmeasure == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    assert s["rouge2"].precision == pytest.approx(1 / 4) and s["rouge2"].recall == pytest.approx(1 / 5)
    assert s["rougeL"].precision == pytest.approx(3 / 5)  # LCS "the cat the"


def test_hand_computed_summary_level_lcs_from_the_paper():
    # Lin (2004), section 3.2: r = w1..w5, c1 = w1 w2 w6 w7 w8, c2 = w1 w3 w8 w9 w5 -> union LCS w1 w2 w3 w5
    ref = [["w1", "w2", "w3", "w4", "w5"]]
    cand = [["w1", "w2", "w6", "w7", "w8"], ["w1", "w3", "w8", "w9", "w5"]]
    s = summary_lcs_score(ref, cand)
    assert s.recall == pytest.approx(4 / 5) and s.precision == pytest.approx(4 / 10)


def test_tokenizer_and_stemming():
    assert tokenize("The café's 2 runners, RUNNING!") == ["the", "caf", "s", "2", "runners", "running"]
    assert tokenize("runners running ran", use_stemmer=True) == ["runner", "run", "ran"]


def test_bit_parallel_lcs_equals_the_table_and_its_backtrack():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        t, rows = table(a, b), lcs_rows(a, b)
        for i in range(len(a) + 1):
            for j in range(len(b) + 1):
                assert t[i][j] == j - (rows[i] & ((1 << j) - 1)).bit_count()
        assert len(lcs_indices(a, b)) == t[-1][-1]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_matches_rouge_score_exactly_on_random_pairs(use_stemmer):
    rng = random.Random(11 + use_stemmer)
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer)
    preds, refs, expected = [], [], []
    for _ in range(300):
        pred = random_text(rng)
        ref = [random_text(rng) for _ in range(rng.randint(1, 3))]
        preds.append(pred)
        refs.append(ref[0] if len(ref) == 1 else ref)
        expected.append(scorer.score(ref[0], pred) if len(ref) == 1 else scorer.score_multi(ref, pred))
    ours = rouge_scores(preds, refs, TYPES, use_stemmer=use_stemmer)
    for o, e, p, r in zip(ours, expected, preds, refs):
        for kind in TYPES:
            assert tuple(o[kind]) == tuple(e[kind]), (kind, p, r)  # exact, not approximate


def test_bootstrap_equals_rouge_score_aggregator_with_the_same_seed():
    rng = random.Random(5)
    preds = [random_text(rng) for _ in range(40)]
    refs = [random_text(rng) for _ in range(40)]
    ours = bootstrap_aggregate(rouge_scores(preds, refs, ["rouge1", "rougeL"]), n_samples=200, seed=3)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    agg = scoring.BootstrapAggregator(n_samples=200)
    for p, r in zip(preds, refs):
        agg.add_scores(scorer.score(r, p))
    np.random.seed(3)  # rouge-score draws from numpy's global generator
    theirs = agg.aggregate()
    for kind in ("rouge1", "rougeL"):
        for part in ("low", "mid", "high"):
            assert tuple(getattr(ours[kind], part)) == pytest.approx(tuple(getattr(theirs[kind], part)), abs=1e-12)
        assert ours[kind].low.fmeasure <= ours[kind].mid.fmeasure <= ours[kind].high.fmeasure
    again = bootstrap_aggregate(rouge_scores(preds, refs, ["rouge1", "rougeL"]), n_samples=200, seed=3)
    assert again == ours


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="must be lists"):
        rouge_scores("a b", "a b")
    with pytest.raises(TypeError, match="prediction must be a string"):
        rouge_scores([3], ["a"])
    with pytest.raises(TypeError, match="each reference must be a string"):
        rouge_scores(["a"], [[None]])
    with pytest.raises(ValueError, match="unknown rouge type 'rougeX'"):
        rouge_pair("a", "a", ["rougeX"])
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_pair("a", [])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_aggregate([{"rouge1": (1.0, 1.0, 1.0)}], confidence=2)
