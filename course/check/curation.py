"""Self-checks for data curation: MinHash, LSH banding, clustering, choosing bands, duplicate lines."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import numpy as np

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _seed,
    salted_hash_calls,
    watching,
)
from course.check.tokenization import _random_text

# ----------------------------------------------------------------------------- data curation


def _set_pair(rng: random.Random, j: float, size: int, start: int) -> tuple[set[str], set[str], float]:
    """Two shingle sets with Jaccard close to j (exact value returned), drawn from fresh shingle names."""
    union = size
    inter = round(j * union)
    only = union - inter
    a_only = only // 2
    names = [f"s{start + k} w{rng.randrange(10**6)}" for k in range(union)]
    common, rest = names[:inter], names[inter:]
    a = set(common) | set(rest[:a_only])
    b = set(common) | set(rest[a_only:])
    return a, b, len(a & b) / len(a | b)


WATCH_MINHASH = ("dataset_curation.minhash.minhash_signatures", "dataset_curation.minhash.signatures_from_hashes",
                 "datasketch.MinHash.update")


@_check(hints=(
    "Give each of the num_perm hash functions its own random parameters drawn from the seed, and keep per set the "
    "minimum value under each function. Invariant: the fraction of signature positions where two sets agree "
    "estimates their Jaccard similarity (identical sets agree everywhere), and the same seed gives the same "
    "signatures.",
    "Hash each shingle to an integer with a fixed function of its bytes (zlib.crc32, say), never Python's hash(), "
    "which is salted per process. Then apply num_perm independent random affine maps modulo a large prime, each with "
    "its own multiplier and offset: shifted copies of one permutation move together and the estimates scatter."))
def minhash(fn: Callable, num_perm: int = 256, seed: int | None = None, log: bool = True) -> Result:
    """fn(shingle_sets, num_perm, seed) -> signatures: a numpy array of shape (len(shingle_sets), num_perm).

    shingle_sets is a list of sets of strings. Signature rows of two sets agree in a fraction of positions that
    estimates their Jaccard similarity. The check builds pairs with known Jaccard from 0 to 1 and compares your
    estimates and dataset_curation.minhash.minhash_signatures' with the exact values: every estimate of yours
    within 6 standard errors of the truth (the worst case, Jaccard 0.5: 0.2 at num_perm=256, 0.375 at 64) and a
    mean error under 0.45 / sqrt(num_perm), at least 0.05 (a correct one averages ~0.28 / sqrt(num_perm)).
    """
    from dataset_curation.minhash import minhash_signatures

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    sets, exact = [], []
    for k in range(33):
        a, b, j = _set_pair(rng, (k % 11) / 10, rng.randint(40, 200), 1000 * k)
        sets += [a, b]
        exact.append(j)
    exact = np.array(exact)
    # Small sets (12-24 shingles) at Jaccard 0.3-0.7: independent hash functions give a binomial scatter around the
    # truth; functions that share parameters (one multiplier, one permutation shifted) move together and scatter more.
    small, small_exact = [], []
    for k in range(40):
        a, b, j = _set_pair(rng, (0.3, 0.5, 0.7)[k % 3], rng.randint(12, 24), 100_000 + 1000 * k)
        small += [a, b]
        small_exact.append(j)
    small_exact = np.array(small_exact)
    what = f"{len(sets)} shingle sets in {len(exact)} pairs, exact Jaccard 0.0 .. 1.0, num_perm={num_perm}, seed={s}"
    n = len(sets) + len(small)
    try:
        with salted_hash_calls(fn) as salted, watching(WATCH_MINHASH, called, fn):
            sig = np.asarray(fn([set(x) for x in sets + small], num_perm, s))
            again = np.asarray(fn([set(x) for x in sets + small], num_perm, s))
    except Exception as e:
        return _finish("minhash", False, _crash(e, what), s, log)
    if sig.shape != (n, num_perm):
        return _finish("minhash", False, f"{what}\n  expected signatures of shape {(n, num_perm)} (plus "
                       f"{len(small)} small sets), got {sig.shape}", s, log)
    if salted:
        return _finish("minhash", False, f"{what}\n  your code called hash() on a {salted[0]} ({len(salted)} calls): "
                       "Python salts that hash per process (PYTHONHASHSEED), so the next run, or a worker process, "
                       "gets other signatures and documents deduplicated in different runs never match; hash the "
                       "bytes with a fixed function such as zlib.crc32(s.encode())", s, log)
    if not np.array_equal(sig, again):
        return _finish("minhash", False, f"{what}\n  two calls with the same seed gave different signatures: the "
                       "hash functions must come from the seed alone (Python's hash() of str is salted per process; "
                       "use a fixed hash such as zlib.crc32)", s, log)
    sig, sig_small = sig[: len(sets)], sig[len(sets):]
    ref = minhash_signatures(sets, num_perm=num_perm, seed=s)
    est = (sig[0::2] == sig[1::2]).mean(axis=1)
    est_ref = (ref[0::2] == ref[1::2]).mean(axis=1)
    err, err_ref = np.abs(est - exact), np.abs(est_ref - exact)
    worst = int(err.argmax())
    summary = (f"mean |estimate - Jaccard|: yours {err.mean():.4f}, reference {err_ref.mean():.4f}; worst pair "
               f"{worst}: exact {exact[worst]:.3f}, yours {est[worst]:.3f}, reference {est_ref[worst]:.3f}")
    # Bounds in standard errors of a num_perm-sample estimate, so a correct function fails about once in 10^6
    # runs whatever num_perm the learner picks (a fixed 0.2 was only 3.2 standard errors at num_perm=64).
    worst_ok, mean_ok = max(0.2, 3.0 / math.sqrt(num_perm)), max(0.05, 0.45 / math.sqrt(num_perm))
    if err.max() > worst_ok or err.mean() > mean_ok:
        hint = ""
        if np.all(sig == sig[:, :1]):
            hint = "\n  hint: every column of a row is equal: each of the num_perm hash functions must differ"
        elif est.std() < 0.05:
            hint = "\n  hint: your estimates hardly vary with the true similarity: keep the MINIMUM hash per function"
        return _finish("minhash", False, f"{what}\n  {summary}{hint}", s, log)
    est_small = (sig_small[0::2] == sig_small[1::2]).mean(axis=1)
    mse, binomial = float(((est_small - small_exact) ** 2).mean()), float((small_exact * (1 - small_exact)).mean())
    # 2.5x the binomial variance: a correct function goes over it about once in 10^7 runs (chi-square, 40 pairs).
    if mse > 2.5 * binomial / num_perm:
        return _finish("minhash", False, f"{what}\n  on {len(small_exact)} pairs of small sets (12-24 shingles, "
                       f"Jaccard 0.3-0.7) your estimates scatter too much: mean squared error {mse:.4f}, while "
                       f"{num_perm} independent hash functions give {binomial / num_perm:.4f} on average\n  hint: "
                       "the num_perm functions must be independent, each with its own random parameters; functions "
                       "sharing a multiplier (a shifted copy of one permutation) pick related minima", s, log)
    return _finish("minhash", True, f"{what}\n  {summary}", s, log,
                   uses_reference=called or _calls_reference(
                       fn, {"minhash_signatures", "signatures_from_hashes", "MinHash"}))

# ----------------------------------------------------------------------------- LSH, clustering, filters, BPE encoding


def _planted_signatures(rng: np.random.Generator, n: int, num_perm: int, rows: int) -> np.ndarray:
    """Random uint32 signatures where some documents copy whole or partial bands from others."""
    sig = rng.integers(0, 2**32 - 1, (n, num_perm), dtype=np.uint64).astype(np.uint32)
    for _ in range(n):
        i, j = rng.integers(0, n, 2)
        start = int(rng.integers(0, num_perm))
        length = int(rng.integers(1, 2 * rows + 1))
        sig[j, start : start + length] = sig[i, start : start + length]
    for _ in range(max(2, n // 10)):  # buckets of 3-5 documents: every two of them are a candidate pair
        docs = rng.choice(n, int(rng.integers(3, 6)), replace=False)
        k = int(rng.integers(0, num_perm // rows))
        sig[docs[1:], k * rows : (k + 1) * rows] = sig[docs[0], k * rows : (k + 1) * rows]
    return sig


WATCH_LSH = ("dataset_curation.minhash.lsh_candidate_pairs", "dataset_curation.minhash.near_duplicate_clusters")


@_check(hints=(
    "Cut every signature into bands of `rows` consecutive values (columns past bands * rows are unused) and bucket "
    "the documents by each band's exact values; two documents are candidates when they share a bucket in some band. "
    "Invariant: every pair you report agrees on one whole band, and appears once, with i < j.",
    "Keep one dictionary per band, keyed by the band's values as a tuple or bytes, listing the documents seen with "
    "it. A bucket of m documents gives all m(m-1)/2 of its pairs, not only pairs with its first member; a set of "
    "pairs keeps a pair found in several bands once."))
def lsh_candidates(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(signatures, bands, rows) -> the candidate pairs: (i, j) with i < j whose signatures agree on a whole band.

    signatures is a uint32 array (n_docs, num_perm); band k is columns k*rows .. (k+1)*rows - 1; columns past
    bands*rows are not used. Return any iterable of pairs. Reference: dataset_curation.minhash.lsh_candidate_pairs
    (compared as sets, exactly).
    """
    from dataset_curation.minhash import lsh_candidate_pairs

    s = _seed(seed)
    called = Counter()
    rng = np.random.default_rng(s)
    for trial in range(trials):
        bands, rows = int(rng.integers(2, 12)), int(rng.integers(1, 6))
        num_perm = bands * rows + int(rng.integers(0, 5))
        n = int(rng.integers(10, 60))
        sig = _planted_signatures(rng, n, num_perm, rows)
        what = f"trial {trial}: {n} signatures of {num_perm} values, bands={bands}, rows={rows}"
        expected = {tuple(p) for p in lsh_candidate_pairs(sig, bands, rows, max_bucket=10**9).tolist()}
        try:
            with watching(WATCH_LSH, called, fn):
                got = {tuple(int(i) for i in p) for p in fn(sig.copy(), bands, rows)}
        except Exception as e:
            return _finish("lsh_candidates", False, _crash(e, what), s, log)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            msg = f"{what}\n  expected {len(expected)} pairs, got {len(got)}"
            if missing:
                i, j = missing[0]
                k = next(k for k in range(bands)
                         if (sig[i, k * rows:(k + 1) * rows] == sig[j, k * rows:(k + 1) * rows]).all())
                msg += f"\n  missing {missing[:5]}: e.g. documents {i} and {j} agree on all of band {k} " \
                       f"(columns {k * rows}..{(k + 1) * rows - 1})"
                cols = sig[:, k * rows:(k + 1) * rows]
                bucket = [d for d in range(n) if (cols[d] == cols[i]).all()]
                if len(bucket) > 2:
                    msg += (f"\n  hint: documents {bucket} all fall in one bucket of band {k}: every two documents "
                            f"in a bucket are a candidate pair ({len(bucket) * (len(bucket) - 1) // 2} pairs here), "
                            "not only each with the bucket's first")
            if extra:
                i, j = extra[0]
                bad = [p for p in extra if p[0] >= p[1]]
                msg += f"\n  not candidates: {extra[:5]}" + (
                    "; pairs must have i < j, each pair once" if bad else
                    f": documents {i} and {j} share no whole band (agreeing columns: "
                    f"{np.flatnonzero(sig[i] == sig[j]).tolist()[:12]})")
            return _finish("lsh_candidates", False, msg, s, log)
    return _finish("lsh_candidates", True, f"{trials} random signature sets with planted shared bands: the same "
                   "candidate pairs as dataset_curation.minhash.lsh_candidate_pairs", s, log,
                   uses_reference=called or _calls_reference(fn, {"lsh_candidate_pairs", "near_duplicate_clusters"}))


WATCH_CLUSTERS = ("dataset_curation.minhash.union_find_clusters", "dataset_curation.minhash.near_duplicate_clusters")


@_check(hints=(
    "The clusters are the connected components of the graph whose edges are the pairs, so pairs chain. Invariant: "
    "the two documents of every pair end up in the same cluster, and documents that appear in no pair are left out.",
    "Union-find does it in near-linear time: every document starts as its own root, each pair joins the roots of its "
    "two ends, and path compression keeps the lookups short. Group the documents by their final root and keep the "
    "groups with at least two members."))
def clusters(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(n, pairs) -> clusters: connected components of n documents joined by the pairs (i, j).

    Return a list of lists of indices, only components with at least two members, in any order. Pairs chain:
    (0, 1) and (1, 2) put 0, 1, 2 in one cluster. Reference: dataset_curation.minhash.union_find_clusters.
    """
    from dataset_curation.minhash import union_find_clusters

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        n = rng.randint(5, 80)
        pairs = sorted({tuple(sorted(rng.sample(range(n), 2))) for _ in range(rng.randint(0, n))})
        what = f"trial {trial}: n={n}, {len(pairs)} pairs, first {pairs[:6]}"
        expected = sorted(sorted(c) for c in union_find_clusters(n, np.array(pairs, dtype=np.int64).reshape(-1, 2)))
        try:
            with watching(WATCH_CLUSTERS, called, fn):
                got = sorted(sorted(int(i) for i in c) for c in fn(n, [tuple(p) for p in pairs]))
        except Exception as e:
            return _finish("clusters", False, _crash(e, what), s, log)
        if got != expected:
            hint = ""
            if any(len(c) < 2 for c in got):
                hint = "\n  hint: leave out documents with no near-duplicate (clusters of one)"
            elif len(got) > len(expected):
                hint = "\n  hint: more clusters than expected: pairs chain ((0, 1) and (1, 2) make one cluster)"
            return _finish("clusters", False, f"{what}\n  expected {len(expected)} clusters, first "
                           f"{expected[:3]}\n  got {len(got)}, first {got[:3]}{hint}", s, log)
    return _finish("clusters", True, f"{trials} random graphs: the same clusters as union_find_clusters", s, log,
                   uses_reference=called or _calls_reference(fn, {"union_find_clusters", "near_duplicate_clusters"}))


def band_cost(bands: int, rows: int, threshold: float, points: int = 401) -> float:
    """False-positive plus false-negative probability mass of LSH with bands x rows around a Jaccard threshold.

    The integral of P(s) = 1 - (1 - s^rows)^bands over s < threshold plus that of 1 - P(s) over s >= threshold
    (trapezoid rule on `points` points per side).
    """
    lo = np.linspace(0.0, threshold, points)
    hi = np.linspace(threshold, 1.0, points)
    p = lambda s: 1.0 - (1.0 - s**rows) ** bands
    return float(np.trapezoid(p(lo), lo) + np.trapezoid(1.0 - p(hi), hi))


def best_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """The (bands, rows) with bands * rows <= num_perm and the least band_cost: check.choose_bands' answer."""
    return min(((b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)),
               key=lambda br: band_cost(*br, threshold))


WATCH_BANDS = ("course.check.curation.best_bands", "course.check.best_bands")


@_check(hints=(
    "A pair of Jaccard s becomes a candidate with probability 1 - (1 - s^rows)^bands, an S-curve with its midpoint "
    "near (1/bands)^(1/rows); band_cost adds that curve's mass below the threshold to the mass it misses above. "
    "Invariant: bands * rows never exceeds num_perm, and no other allowed (bands, rows) costs less than yours.",
    "The space is small enough to search whole: every bands from 1 to num_perm with every rows that still fits, "
    "scored by check.band_cost at the threshold, keeping the cheapest. Aiming the midpoint at the threshold is not "
    "enough, and swapping bands and rows gives a very different curve."))
def choose_bands(fn: Callable, seed: int | None = None, log: bool = True) -> Result:
    """fn(num_perm, threshold) -> (bands, rows) with bands * rows <= num_perm minimising check.band_cost.

    band_cost(b, r, t) is the probability mass of false positives (pairs below t that become candidates) plus false
    negatives (pairs above t that do not). Yours passes when its cost is within 1e-3 of the best over all (b, r).
    """
    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    settings = [(rng.choice([64, 112, 128, 256]), t) for t in rng.sample([0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9], 4)]
    for num_perm, t in settings:
        what = f"num_perm={num_perm}, threshold={t}"
        best = best_bands(num_perm, t)
        try:
            with watching(WATCH_BANDS, called, fn):
                b, r = (int(v) for v in fn(num_perm, t))
        except Exception as e:
            return _finish("choose_bands", False, _crash(e, what), s, log)
        if b < 1 or r < 1 or b * r > num_perm:
            return _finish("choose_bands", False, f"{what}\n  ({b}, {r}) needs {b * r} permutations; at most "
                           f"{num_perm} (bands and rows >= 1)", s, log)
        cost, best_cost = band_cost(b, r, t), band_cost(*best, t)
        if cost > best_cost + 1e-3:
            hint = ""
            if band_cost(r, b, t) <= best_cost + 1e-3:
                hint = "\n  hint: bands and rows are swapped"
            return _finish("choose_bands", False, f"{what}\n  yours bands={b}, rows={r}: cost {cost:.4f} (S-curve "
                           f"midpoint (1/b)^(1/r) = {(1 / b) ** (1 / r):.3f}); the best is bands={best[0]}, "
                           f"rows={best[1]}: cost {best_cost:.4f}{hint}", s, log)
    return _finish("choose_bands", True, f"{len(settings)} (num_perm, threshold) settings: your bands x rows within "
                   "1e-3 of the least false-positive + false-negative mass", s, log,
                   uses_reference=called or _calls_reference(fn, {"best_bands"}))


def _repeated_text(rng: random.Random) -> str:
    pool = [_random_text(rng, rng.randint(1, 8)).strip() for _ in range(rng.randint(2, 8))]
    lines = []
    for _ in range(rng.randint(1, 30)):
        line = rng.choice(pool)
        lines.append(rng.choice(["", " ", "  "]) + line + rng.choice(["", " "]))
        if rng.random() < 0.15:
            lines.append(rng.choice(["", "   "]))
    return "\n".join(lines)


WATCH_DUP_LINES = ("dataset_curation.filters._dup_fraction", "dataset_curation.filters.gopher_repetition")


@_check(hints=(
    "Split the text on newlines, strip every line and drop the lines that are empty after stripping; a kept line is "
    "a repeat when the same stripped line was kept before it. Invariant: a first occurrence never counts, so "
    "distinct lines give (0.0, 0.0), and so does a text with no non-blank lines.",
    "Go through the kept lines once with a set of the lines seen so far: a line already in it adds one repeat and "
    "its stripped length to the repeated characters. Divide by the number of kept lines and by their total stripped "
    "length: blank lines are in neither count, and lines that differ only in surrounding spaces are the same line."))
def dup_lines(fn: Callable, trials: int = 30, seed: int | None = None, log: bool = True) -> Result:
    """fn(text) -> (fraction of lines that repeat an earlier line, fraction of line characters in those repeats).

    Gopher's repetition rule on lines: split on "\\n", strip each line, drop the empty ones; a line is a repeat
    when an identical (stripped) line came before it; the character fraction is the characters of the repeats over
    the characters of all kept lines. A document with no lines gives (0.0, 0.0). Reference:
    dataset_curation.filters (the rule gopher_repetition applies); tolerance 1e-9.
    """
    from dataset_curation.filters import _dup_fraction

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        text = _repeated_text(rng) if trial else ""
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        expected = _dup_fraction(lines)
        what = f"trial {trial}: {len(lines)} non-empty lines, {len(set(lines))} distinct; text {text[:70]!r}"
        try:
            with watching(WATCH_DUP_LINES, called, fn):
                got = tuple(float(v) for v in fn(text))
        except Exception as e:
            return _finish("dup_lines", False, _crash(e, what), s, log)
        if len(got) != 2 or any(abs(a - b) > 1e-9 for a, b in zip(got, expected)):
            counts = Counter(lines)
            every = sum(c for c in counts.values() if c > 1) / max(len(lines), 1)
            hint = ""
            if got and abs(got[0] - every) <= 1e-9 and every != expected[0]:
                hint = "\n  hint: you count the first occurrence too; only the lines after it are repeats"
            else:
                raw = text.split("\n")
                variants = {  # the hint names a mistake only when your numbers are that mistake's
                    "strip each line: your numbers are those of unstripped lines, where '  x' and 'x' differ":
                        [ln for ln in raw if ln.strip()],
                    "leave out the empty lines: your numbers count the lines that are blank after strip()":
                        [ln.strip() for ln in raw],
                    "strip each line and leave out the empty ones before counting: your numbers are those of the "
                    "raw lines": raw,
                }
                for why, items in variants.items():
                    if len(got) == 2 and all(abs(a - b) <= 1e-9 for a, b in zip(got, _dup_fraction(items))):
                        hint = f"\n  hint: {why}"
                        break
            return _finish("dup_lines", False, f"{what}\n  expected {expected}, got {got}{hint}", s, log)
    return _finish("dup_lines", True, f"{trials} random documents (repeated lines, blank lines, stray spaces, one "
                   "empty): equal to dataset_curation's duplicate-line rule", s, log,
                   uses_reference=called or _calls_reference(fn, {"_dup_fraction", "gopher_repetition"}))
