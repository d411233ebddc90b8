"""BLEU: hand-computed cases, and agreement with sacrebleu on hundreds of random segment sets."""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU

from metrics.bleu import corpus_bleu, score_from_stats, sentence_bleu, tokenize, tokenize_13a

# Words that exercise every tokenizer rule: punctuation, numbers with separators, dashes, XML escapes,
# <skipped>, casing, accents, non-Latin scripts, symbols, emoji, non-ASCII digits.
WORDS = ["the", "The", "THE", "cat", "Cat", "sat", "on", "mat", "a", "3.14", "1,000", "end.", "e.g.", "U.S.A.",
         "dog,", "(paren)", "it's", "x-ray", "5-6", "2-", "--", "...", "&amp;", "&quot;hi&quot;", "&lt;b&gt;",
         "<skipped>", "café", "naïve", "Über", "İstanbul", "«quoted»", "—", "€5", "$", "½", "٣", "日本語", "😀",
         "Ω", "ß", "a/b", "{x}", "50%", "#tag", "@me", "~", "`q`", "[1]"]


def random_segment(rng: random.Random) -> str:
    n = rng.choice([0, 0, 1, 2, 3, 5, 8, 12, 20])  # includes empty segments
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    if rng.random() < 0.15:
        s = s.replace(" ", "", 1)  # glue two words: punctuation inside a word
    if rng.random() < 0.1:
        s = s + "\n" + s + " \t"
    if rng.random() < 0.05:
        s = s.replace(" ", "-\n", 1)
    return s


def same_result(ours, theirs) -> bool:
    return (abs(ours.score - theirs.score) <= 1e-9 and ours.counts == theirs.counts
            and ours.totals == theirs.totals and ours.sys_len == theirs.sys_len and ours.ref_len == theirs.ref_len
            and ours.precisions == pytest.approx(theirs.precisions, abs=1e-12) and ours.bp == theirs.bp)


def test_hand_computed_single_sentence():
    r = corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    # clipped matches / totals: 1-grams 5/6 ("the" only once), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; BP = 1
    assert r.counts == [5, 3, 2, 1] and r.totals == [6, 5, 4, 3]
    assert r.bp == 1.0 and (r.sys_len, r.ref_len) == (6, 6)
    assert r.score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-12)


def test_hand_computed_brevity_penalty_and_clipping():
    r = corpus_bleu(["the the the the"], [["the cat is on the mat today"]], smooth_method="none",
                    max_ngram_order=1)
    assert r.counts == [2] and r.totals == [4]  # "the" is clipped to its 2 reference occurrences
    assert r.bp == pytest.approx(math.exp(1 - 7 / 4))
    assert r.score == pytest.approx(100 * math.exp(1 - 7 / 4) * 0.5)


def test_corpus_bleu_sums_statistics_instead_of_averaging():
    hyps, refs = ["a b c d", "x y"], ["a b c d", "x z"]
    r = corpus_bleu(hyps, [refs], smooth_method="none")
    assert r.counts == [5, 3, 2, 1] and r.totals == [6, 4, 2, 1]
    assert r.score == pytest.approx(100 * (5 / 6 * 3 / 4 * 2 / 2 * 1 / 1) ** 0.25)


def test_closest_reference_length_ties_to_shorter():
    r = corpus_bleu(["a b c d"], [["a b c"], ["a b c d e"]])
    assert r.ref_len == 3  # 3 and 5 are both 1 away from 4


def test_13a_tokenizer_rules():
    assert tokenize_13a("Hello, world.") == ["Hello", ",", "world", "."]
    assert tokenize_13a("pi is 3.14 and 1,000 people") == ["pi", "is", "3.14", "and", "1,000", "people"]
    assert tokenize_13a("pages 5-6, x-ray") == ["pages", "5", "-", "6", ",", "x-ray"]
    assert tokenize_13a("&quot;hi&quot; <skipped>") == ['"', "hi", '"']
    assert tokenize("Hello World", "13a", lowercase=True) == ["hello", "world"]
    assert tokenize("日本", "char") == ["日", "本"]


def test_zero_matches_and_empty_hypothesis_score_zero():
    assert corpus_bleu(["x y z"], [["a b c"]]).score == 0.0
    r = corpus_bleu([""], [["a b c"]])
    assert r.score == 0.0 and r.bp == 0.0 and r.sys_len == 0


def test_smoothing_by_hand():
    # 2 of 3 unigrams, 1 of 2 bigrams, no trigram or 4-gram match
    stats = dict(correct=[2, 1, 0, 0], total=[3, 2, 1, 0], sys_len=3, ref_len=3)
    exp = score_from_stats(**stats, smooth_method="exp")
    assert exp.precisions[:3] == pytest.approx([200 / 3, 50, 100 / (2 * 1)])
    floor = score_from_stats(**stats, smooth_method="floor", smooth_value=0.1)
    assert floor.precisions[2] == pytest.approx(100 * 0.1 / 1)
    eff = score_from_stats(**stats, smooth_method="none", effective_order=True)
    assert eff.score == 0.0  # the 3-gram order has n-grams but no matches
    addk = score_from_stats(**stats, smooth_method="add-k", smooth_value=1)
    assert addk.counts == [2, 2, 1, 1] and addk.totals == [3, 3, 2, 1]  # k added from order 2 on, as sacrebleu


@pytest.mark.parametrize("seed", range(3))
def test_corpus_bleu_matches_sacrebleu_on_random_inputs(seed):
    rng = random.Random(1000 + seed)
    for _ in range(120):
        n_seg, n_refs = rng.randint(1, 6), rng.randint(1, 3)
        hyps = [random_segment(rng) for _ in range(n_seg)]
        refs = [[random_segment(rng) for _ in range(n_seg)] for _ in range(n_refs)]
        if n_refs > 1 and rng.random() < 0.3:
            refs[-1][rng.randrange(n_seg)] = None  # a segment with fewer references
        opts = dict(tokenize=rng.choice(["13a", "intl", "char", "none"]),
                    smooth_method=rng.choice(["none", "floor", "add-k", "exp"]),
                    lowercase=rng.random() < 0.5, max_ngram_order=rng.randint(1, 6))
        opts["smooth_value"] = rng.choice([None, 0.5, 2]) if opts["smooth_method"] in ("floor", "add-k") else None
        eff = rng.random() < 0.5
        metric = BLEU(effective_order=eff, **opts)
        theirs = metric.corpus_score(hyps, refs)
        ours = corpus_bleu(hyps, refs, use_effective_order=eff, **opts)
        assert same_result(ours, theirs), (opts, eff, hyps, refs, ours, theirs)
        assert ours.signature == metric.get_signature().format().rsplit("|version:", 1)[0]


def test_sentence_bleu_matches_sacrebleu_on_random_inputs():
    rng = random.Random(7)
    for _ in range(150):
        hyp = random_segment(rng)
        refs = [random_segment(rng) for _ in range(rng.randint(1, 4))]
        method = rng.choice(["none", "floor", "add-k", "exp"])
        ours = sentence_bleu(hyp, refs, smooth_method=method)
        theirs = sacrebleu.sentence_bleu(hyp, refs, smooth_method=method)
        assert same_result(ours, theirs), (hyp, refs, method)


def test_compat_corpus_bleu_default_call_matches():
    rng = random.Random(3)
    hyps = [random_segment(rng) for _ in range(200)]
    refs = [[random_segment(rng) for _ in range(200)], [random_segment(rng) for _ in range(200)]]
    assert same_result(corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, refs))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="2 segments but there are 1 hypotheses"):
        corpus_bleu(["a b"], [["a b", "c d"]])
    with pytest.raises(TypeError, match="flat list of strings"):
        corpus_bleu(["a b"], ["a b"])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] is a int"):
        corpus_bleu(["a", 3], [["a", "b"]])
    with pytest.raises(TypeError, match=r"references\[0\]\[0\] is a int"):
        corpus_bleu(["a"], [[5]])
    with pytest.raises(ValueError, match="hypotheses is empty"):
        corpus_bleu([], [[]])
    with pytest.raises(ValueError, match="tokenize='spacy' is unknown"):
        corpus_bleu(["a"], [["a"]], tokenize="spacy")
    with pytest.raises(ValueError, match="smooth_method"):
        corpus_bleu(["a"], [["a"]], smooth_method="laplace")
    with pytest.raises(ValueError, match="no reference"):
        corpus_bleu(["a"], [[None]])
    with pytest.raises(TypeError, match="sentence_bleu"):
        corpus_bleu("a b c", [["a b c"]])
    with pytest.raises(TypeError, match="list of strings"):
        sentence_bleu("a b", "a b")
