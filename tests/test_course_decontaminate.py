"""check.decontaminate: the learner's solution passes, plausible wrong versions fail, the package's counts as the
reference's, and the notebook's use of it agrees with the pipeline's stage 8."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata

import pytest

from course import check
from course.solutions import my_decontaminate

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    path = tmp_path / "checks.jsonl"
    monkeypatch.setenv("COURSE_LOG", str(path))
    return path


def _words(text: str, bug: str | None) -> list[str]:
    if bug == "package_normalisation":
        from dataset_curation.minhash import normalize_for_shingles

        return normalize_for_shingles(text).split()
    if bug == "no_normalisation":
        return text.split()
    text = text.lower()
    if bug != "no_accents":
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    if bug != "digits_kept":
        text = re.sub(r"\d", "0", text)
    return re.sub(r"\W+" if bug == "underscore_in_words" else r"[\W_]+", " ", text).split()


def _grams(words: list[str], n: int, bug: str | None) -> list:
    if len(words) < n:
        return [tuple(words)] if bug == "short_as_one" and words else []
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return [hash(g) for g in grams] if bug == "salted_hash" else grams


def _bank(texts: list[str], n: int, bug: str | None, across: bool) -> set:
    if across:  # every text's words in one stream: n-grams span the joins
        return set(_grams([w for t in texts for w in _words(t, bug)], n, bug))
    return {g for t in texts for g in _grams(_words(t, bug), n, bug)}


def _decontaminate_variant(docs, stats, eval_texts, ngram, min_fraction, bug=None):
    """The stage written with one planted mistake (bug=None: correct)."""
    val = [d["text"] for d in docs if d.get("split") == "val"]
    val_bank = _bank(val, ngram, bug, bug == "across_val_docs")
    eval_bank = _bank(list(eval_texts), ngram, bug, bug == "across_eval_texts")
    kept = []
    for doc in docs:
        if doc.get("split") == "val":
            if bug != "val_not_counted":
                stats.keep(len(doc["text"]), doc)
            kept.append(doc)
            continue
        mine = _grams(_words(doc["text"], bug), ngram, bug)
        if bug == "distinct_ngrams":
            mine = list(set(mine))
        e = sum(g in eval_bank for g in mine)
        v = sum(g in val_bank for g in mine)
        over = mine and (v / len(mine) > min_fraction if bug == "strict_threshold" else v / len(mine) >= min_fraction)
        if bug == "val_reason_first" and over:
            stats.remove(doc, "overlaps_val")
        elif e > 0:
            stats.remove(doc, "contaminated_eval")
        elif over:
            stats.remove(doc, "overlaps_val")
        else:
            kept.append(stats.keep(len(doc["text"]), doc))
    return kept


def test_the_solution_passes():
    for seed in SEEDS:
        r = check.decontaminate(my_decontaminate, seed=seed)
        assert r and not r.uses_reference, r.message


def test_the_correct_variant_passes():
    for seed in SEEDS:
        assert check.decontaminate(lambda *a: _decontaminate_variant(*a), seed=seed)


def test_the_package_function_is_the_reference():
    from dataset_curation.dedup import decontaminate

    r = check.decontaminate(lambda docs, stats, ev, n, f: decontaminate(docs, stats, ev, n, f), seed=0)
    assert r and r.uses_reference and "dataset_curation.dedup.decontaminate" in r.message
    assert check.decontaminate(check.reference("decontaminate"), seed=1).uses_reference


def test_the_package_normalisation_is_the_reference():
    r = check.decontaminate(lambda *a: _decontaminate_variant(*a, bug="package_normalisation"), seed=0)
    assert r.uses_reference and "normalize_for_shingles" in r.message


def _fails(bug: str, expect: str) -> None:
    for seed in SEEDS:
        r = check.decontaminate(lambda *a: _decontaminate_variant(*a, bug=bug), seed=seed)
        assert not r, f"{bug} passed at seed {seed}"
        assert expect in r.message, r.message


def test_without_normalisation_fails():
    _fails("no_normalisation", "got kept")


def test_without_stripping_accents_fails():
    _fails("no_accents", "expected")


def test_digits_not_mapped_to_zero_fails():
    _fails("digits_kept", "expected")


def test_underscore_inside_words_fails():
    _fails("underscore_in_words", "expected")


def test_ngrams_across_val_documents_fail():
    _fails("across_val_docs", "spans two documents")


def test_ngrams_across_evaluation_texts_fail():
    _fails("across_eval_texts", "spans two texts")


def test_strict_threshold_fails():
    _fails("strict_threshold", "(exactly the min_fraction")


def test_distinct_ngrams_instead_of_positions_fail():
    _fails("distinct_ngrams", "every position counts")


def test_short_text_as_one_ngram_fails():
    _fails("short_as_one", "shorter than n words")


def test_val_reason_before_the_evaluation_reason_fails():
    _fails("val_reason_first", "the stage's counts differ")


def test_val_documents_not_counted_fail():
    _fails("val_not_counted", "the stage's counts differ")


def test_salted_hash_for_ngram_ids_fails_and_really_differs_between_processes():
    _fails("salted_hash", "called hash() on a tuple")
    code = "print(hash(('the', 'same', 'words')))"
    ids = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                          capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(ids) == 2  # an index of such ids saved by one run matches nothing in the next


def test_a_stub_is_not_implemented():
    def stub(docs, stats, eval_texts, ngram, min_fraction):
        raise NotImplementedError("not yet")

    r = check.decontaminate(stub)
    assert not r and r.not_implemented
