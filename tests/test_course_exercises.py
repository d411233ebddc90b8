"""The exercises whose output the learner uses later: each check passes course/solutions.py and fails planted bugs."""

from __future__ import annotations

from collections import Counter

import pytest

from course import check, solutions
from dataset_curation.bpe import pretokenize


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    path = tmp_path / "checks.jsonl"
    monkeypatch.setenv("COURSE_LOG", str(path))
    return path


# ----------------------------------------------------------------------------- incremental BPE


def _incremental_bpe(text, num_merges, tie="smallest", subtract=True):
    """Counts kept across merges (no recount); the planted bugs: ties to the largest pair, old pairs not removed."""
    words = Counter(pretokenize(text))
    seqs = [list(w.encode("utf-8")) for w in words]
    freq = list(words.values())
    counts = Counter()
    for s, f in zip(seqs, freq):
        for p in zip(s, s[1:]):
            counts[p] += f
    merges = []
    for r in range(num_merges):
        live = {p: c for p, c in counts.items() if c > 0}
        if not live or max(live.values()) < 2:
            break
        top = max(live.values())
        tied = [p for p, c in live.items() if c == top]
        pair = min(tied) if tie == "smallest" else max(tied)
        merges.append(pair)
        for j, s in enumerate(seqs):
            if not any(q == pair for q in zip(s, s[1:])):
                continue
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == list(pair):
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            if subtract:
                for p in zip(s, s[1:]):
                    counts[p] -= freq[j]
            else:
                counts[pair] = 0
            for p in zip(out, out[1:]):
                counts[p] += freq[j]
            seqs[j] = out
    return merges


def test_bpe_incremental_passes_the_solution_and_is_the_learners():
    r = check.bpe_incremental(solutions.my_train_bpe_incremental)
    assert r and not r.uses_reference
    assert "faster than recounting" in r.message


def test_bpe_incremental_equals_the_recount_on_random_text():
    from course.check.tokenization import _random_text, _recount_bpe

    rng = __import__("random").Random(5)
    for _ in range(4):
        text = _random_text(rng, 300)
        assert solutions.my_train_bpe_incremental(text, 80) == _recount_bpe(text, 80) == solutions.my_train_bpe(
            text, 80)


def test_bpe_incremental_fails_the_recounting_trainer():
    r = check.bpe_incremental(solutions.my_train_bpe, seed=2)
    assert not r and "recounting every pair" in r.message and "merges are right" in r.message


@pytest.mark.parametrize("kw, says", [({"tie": "largest"}, "a tie in counts"),
                                      ({"subtract": False}, "merge ")])
def test_bpe_incremental_fails_planted_bugs(kw, says):
    r = check.bpe_incremental(lambda text, n: _incremental_bpe(text, n, **kw), seed=4)
    assert not r and says in r.message


def test_bpe_incremental_flags_the_package_trainer():
    from dataset_curation.bpe import train_bpe

    r = check.bpe_incremental(lambda text, n: train_bpe(text, 256 + n + 1).merges, seed=1)
    assert r and r.uses_reference


def test_hf_tokenizers_with_our_merges_encodes_like_ours():
    from course.check.tokenization import _random_text, hf_encode

    rng = __import__("random").Random(9)
    merges = solutions.my_train_bpe_incremental(_random_text(rng, 400), 120)
    text = _random_text(rng, 200) + " héllo wörld 🙂\n\n  x"
    assert solutions.my_bpe_encode(text, merges) == hf_encode(text, merges)
    assert hf_encode("", merges) == []
