"""Self-check for decontamination: training documents that share word n-grams with held-out text (stage 8)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from course.check._harness import Result, _calls_reference, _check, _crash, _finish, _seed, salted_hash_calls, watching

WATCH_DECONTAMINATE = ("dataset_curation.dedup.decontaminate", "dataset_curation.dedup.ngram_hits",
                       "dataset_curation.dedup._ngram_bank", "dataset_curation.minhash.shingle_hashes64",
                       "dataset_curation.minhash.shingles", "dataset_curation.minhash.normalize_for_shingles")
_ACCENTS = {"a": "àáâä", "e": "éèêë", "i": "íï", "o": "óöô", "u": "úüû", "n": "ñ", "c": "ç"}
# what may stand between two words: none of it is a letter or a digit, so the normalized words stay the same
_SEPARATORS = (" ", "  ", "\n", "\t", ", ", ". ", " (", ") ", " = ", "_", " — ", " “", "” ", "/", "-", "…")


def _vocabulary(rng: random.Random, size: int = 300) -> list[str]:
    """Fresh lowercase words, some with digits: two random n-grams of them never meet by chance."""
    words = set()
    while len(words) < size:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
        if rng.random() < 0.15:
            w += str(rng.randint(0, 99))
        words.add(w)
    return sorted(words)


def _disguise(rng: random.Random, words: list[str]) -> str:
    """The same normalized words written differently: case, accents, other digits, punctuation and whitespace."""
    out = []
    for w in words:
        w = "".join(str(rng.randint(0, 9)) if ch.isdigit() else ch for ch in w)
        if rng.random() < 0.3:
            w = "".join(rng.choice(_ACCENTS[ch]) if ch in _ACCENTS and rng.random() < 0.5 else ch for ch in w)
        w = rng.choice((w, w, w.upper(), w.capitalize()))
        out += [w, rng.choice(_SEPARATORS)]
    return "".join(out[:-1])


class _Case:
    """One trial's documents, built up with a note on what each planted training document is."""

    def __init__(self, rng: random.Random, ngram: int, min_fraction: float):
        self.rng, self.n, self.f = rng, ngram, min_fraction
        self.vocab = _vocabulary(rng)
        self.docs: list[dict] = []
        self.notes: dict[str, str] = {}
        self.val: list[list[str]] = []
        self.evals: list[list[str]] = []
        self.short_val: list[str] = []

    def words(self, k: int) -> list[str]:
        return [self.rng.choice(self.vocab) for _ in range(k)]

    def add(self, split: str, text: str, note: str = "") -> None:
        i = f"{split}{len(self.docs)}"
        self.docs.append({"id": i, "text": text, "split": split})
        self.notes[i] = note

    def text(self, words: list[str]) -> str:
        return _disguise(self.rng, words) if self.rng.random() < 0.5 else " ".join(words)

    def with_hits(self, span: list[str], hits: int, positions: int) -> list[str]:
        """positions - 1 + n random words around a copy of `hits` n-grams of span (hits + n - 1 words)."""
        copy = span[: hits + self.n - 1]
        filler = self.words(positions + self.n - 1 - len(copy))
        cut = self.rng.randint(0, len(filler))
        return filler[:cut] + copy + filler[cut:]


def _held_out(c: _Case, with_val: bool, with_eval: bool) -> None:
    n = c.n
    if with_val:
        for _ in range(c.rng.randint(3, 5)):
            c.val.append(c.words(c.rng.randint(4 * n, 8 * n) + 30))  # room for 25 copied n-grams
            c.add("val", c.text(c.val[-1]))
        c.short_val = c.words(n - 1)
        c.add("val", " ".join(c.short_val), "a val document shorter than n words")
    if with_eval:
        for _ in range(c.rng.randint(2, 3)):
            c.evals.append(c.words(c.rng.randint(2 * n, 4 * n)))


def _train_against_val(c: _Case) -> None:
    n, f, rng = c.n, c.f, c.rng
    for _ in range(2):
        positions = int(rng.choice((8, 16, 24)) / f) if f < 1 else 8
        at = round(f * positions)  # f is a power of two: at / positions == f exactly
        for hits, what in ((at, "exactly"), (at - 1, "one n-gram below"), (at + 1, "one n-gram above")):
            src = rng.choice(c.val)
            start = rng.randint(0, len(src) - hits - n + 1)
            words = c.with_hits(src[start:], hits, positions)
            c.add("train", c.text(words), f"{hits} of its {positions} {n}-grams occur in val ({what} the "
                  f"min_fraction {f}), possibly written with other case, accents, digits and punctuation")
    # a val span of 3n words (2n + 1 n-grams) copied `reps` times, each copy followed by a fresh word: as positions
    # about two thirds of the document is in val; as distinct n-grams (the copies' junctions all differ) under f
    src = rng.choice(c.val)
    reps = int((2 * n + 1) * (1 / f - 1) / n) + 2
    words = [w for _ in range(reps) for w in src[: 3 * n] + c.words(1)]
    c.add("train", c.text(words), f"a val span of {3 * n} words repeated {reps} times: every position counts, "
          "so a repeated n-gram counts each time (as positions most of it is in val; as distinct n-grams little)")
    for a, b in zip(c.val, c.val[1:]):
        c.add("train", c.text(a[-(n - 1):] + b[: n - 1]), f"the last {n - 1} words of one val document and the "
              f"first {n - 1} of the next: each {n}-gram spans two documents, none occurs in one")
    c.add("train", c.text(c.short_val), "equal to a val document shorter than n words: neither has n-grams")


def _train_against_eval(c: _Case) -> None:
    n, rng = c.n, c.rng
    for _ in range(2):
        src = rng.choice(c.evals)
        start = rng.randint(0, len(src) - n)
        c.add("train", c.text(c.with_hits(src[start:], 1, int(rng.randint(20, 60)))),
              f"one {n}-gram of an evaluation text (one is enough)")
    for a, b in zip(c.evals, c.evals[1:]):
        c.add("train", c.text(c.words(n) + a[-(n - 1):] + b[: n - 1]), f"words that end one evaluation text and "
              f"start the next: each {n}-gram spans two texts")
    c.evals.append(c.words(n - 1))
    c.add("train", " ".join(c.evals[-1]), "equal to an evaluation text shorter than n words (which has no n-grams)")
    if c.val:
        c.add("val", c.text(c.with_hits(c.evals[0], 3, 3 * n)), "a val document sharing evaluation n-grams "
              "(val documents are always kept)")
        src = c.val[0]
        words = c.with_hits(src, 3 * n, 3 * n) + c.with_hits(c.evals[0][1:], 1, n)
        c.add("train", c.text(words), "overlaps both val and an evaluation text: the evaluation reason wins")


def _decon_case(rng: random.Random, trial: int) -> tuple[list[dict], list[str], int, float, dict[str, str]]:
    """(docs, eval_texts, ngram, min_fraction, notes): held-out text and training documents with planted overlaps."""
    ngram, f = rng.choice((4, 6, 8, 13)), rng.choice((0.125, 0.25, 0.5))
    with_val, with_eval = trial % 3 != 1, trial % 3 != 2
    c = _Case(rng, ngram, f)
    _held_out(c, with_val, with_eval)
    if with_val:
        _train_against_val(c)
    if with_eval:
        _train_against_eval(c)
    for _ in range(4):
        c.add("train", c.text(c.words(rng.randint(2 * ngram, 5 * ngram))), "random words, no overlap")
    c.add("train", " ... !!! -- ", "no words at all")
    return _interleave(rng, c.docs), [_disguise(rng, e) for e in c.evals], ngram, f, c.notes


def _interleave(rng: random.Random, docs: list[dict]) -> list[dict]:
    """Training documents shuffled among the val ones, which keep their order (the planted boundaries stay)."""
    val = [d for d in docs if d["split"] == "val"]
    train = [d for d in docs if d["split"] != "val"]
    rng.shuffle(train)
    slots = set(rng.sample(range(len(docs)), len(val)))
    vi, ti = iter(val), iter(train)
    return [next(vi) if k in slots else next(ti) for k in range(len(docs))]


def _stage_counts(stats) -> dict:
    return {k: getattr(stats, k) for k in ("docs_in", "docs_kept", "docs_removed", "chars_in", "chars_kept",
                                           "chars_removed", "removed")}


def _verdicts(docs: list[dict], stats, kept_ids: set[str]) -> dict[str, str]:
    """Document id -> "kept" or the reason it was removed (from the sample the stage keeps of each reason)."""
    out = {d["id"]: "kept" if d["id"] in kept_ids else "removed" for d in docs}
    for reason, items in stats.samples.items():
        for item in items:
            out[item["id"]] = reason
    return out


def _decon_diff(what: str, docs, notes, exp_kept, got_kept, exp_stats, got_stats) -> str:
    exp_ids, got_ids = [d["id"] for d in exp_kept], [d["id"] for d in got_kept]
    if exp_ids != got_ids:
        exp_v = _verdicts(docs, exp_stats, set(exp_ids))
        got_v = _verdicts(docs, got_stats, set(got_ids))
        bad = next((d for d in docs if (d["id"] in exp_ids) != (d["id"] in got_ids)), None)
        if bad is None:
            return f"{what}\n  the kept documents are right but not in the input's order: keep it"
        return (f"{what}\n  document {bad['id']} ({bad['split']}): expected {exp_v[bad['id']]}, got "
                f"{got_v[bad['id']]}\n  what it is: {notes.get(bad['id']) or 'a document'}\n"
                f"  its text starts {bad['text'][:90]!r}\n  expected {len(exp_ids)} kept, got {len(got_ids)}")
    exp_c, got_c = _stage_counts(exp_stats), _stage_counts(got_stats)
    return (f"{what}\n  the right documents are kept, but the stage's counts differ\n  expected {exp_c}\n  got      "
            f"{got_c}\n  (stats.keep(len(doc['text']), doc) for every kept document, val ones included; "
            "stats.remove(doc, reason, note) with reason contaminated_eval or overlaps_val)")


@_check(hints=(
    "Normalize, cut each text into word n-grams, and collect the held-out n-grams in a set per kind (the evaluation "
    "texts; the val documents). A training document goes when any of its n-grams is an evaluation one, or when the "
    "share of its n-gram positions found in val is at least min_fraction. Invariant: val documents are always kept, "
    "and a document with fewer than n words has no n-grams and stays.",
    "Normalize as the MinHash stage does: lowercase, NFKD with the combining marks dropped, every digit to 0, and "
    "anything that is not a letter or digit (underscore too) separating words. Build n-grams inside each text, "
    "never across two texts, and count positions, not distinct n-grams: the share is hits / (words - n + 1). Call "
    "stats.keep for every kept document (val too) and stats.remove with contaminated_eval before overlaps_val."))
def decontaminate(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(docs, stats, eval_texts, ngram, min_fraction) -> the kept documents, as dedup.decontaminate (stage 8).

    docs are dicts with "id", "text" and "split" ("train" or "val"); stats is a dataset_curation StageStats. A
    training document is removed as "contaminated_eval" when one of its word ngram-grams (normalized text) occurs in
    an evaluation text, else as "overlaps_val" when at least min_fraction of its n-gram positions occur in val
    documents; every other document is kept (stats.keep), in order. The check plants exact and disguised copies,
    overlaps one n-gram either side of the threshold, n-grams spanning two held-out texts, repeated n-grams and
    texts shorter than n words, and compares the kept documents and the counts with the package's, exactly.
    """
    from dataset_curation.dedup import decontaminate as reference
    from dataset_curation.stages import StageStats

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        docs, eval_texts, ngram, f, notes = _decon_case(rng, trial)
        what = (f"trial {trial}: {len(docs)} documents ({sum(d['split'] == 'val' for d in docs)} val), "
                f"{len(eval_texts)} evaluation texts, ngram={ngram}, min_fraction={f}")
        exp_stats = StageStats("decontaminate")
        expected = reference([dict(d) for d in docs], exp_stats, list(eval_texts), ngram, f)
        got_stats = StageStats("decontaminate")
        try:
            with salted_hash_calls(fn) as salted, watching(WATCH_DECONTAMINATE, called, fn):
                got = list(fn([dict(d) for d in docs], got_stats, list(eval_texts), ngram, f))
        except Exception as e:
            return _finish("decontaminate", False, _crash(e, what), s, log)
        if salted:
            return _finish("decontaminate", False, f"{what}\n  your code called hash() on a {salted[0]} "
                           f"({len(salted)} calls): Python salts that hash per process, so an n-gram index saved by "
                           "one run (a benchmark's n-grams, say) matches nothing in the next; keep the n-grams "
                           "themselves (tuples of words) or hash their bytes with a fixed function", s, log)
        if [d["id"] for d in got] != [d["id"] for d in expected] or \
                _stage_counts(got_stats) != _stage_counts(exp_stats):
            return _finish("decontaminate", False, _decon_diff(what, docs, notes, expected, got, exp_stats,
                                                               got_stats), s, log)
    return _finish("decontaminate", True, f"{trials} random corpora with planted overlaps (exact and disguised "
                   "copies, the threshold exactly and one n-gram either side, n-grams across two texts, repeats, "
                   "short texts): the same documents kept and the same counts as dataset_curation.dedup."
                   "decontaminate", s, log,
                   uses_reference=called or _calls_reference(fn, {"decontaminate", "ngram_hits", "_ngram_bank",
                                                                  "shingle_hashes64", "normalize_for_shingles"}))
