"""MinHash + LSH near-duplicate detection, from scratch, vectorized with numpy.

    sig = minhash_signatures(texts, num_perm=112, seed=0)       # (n_docs, 112) uint32
    clusters = near_duplicate_clusters(sig, bands=14, rows=8)  # [[0, 7, 9], [3, 4], ...]: keep 0 and 3

A document becomes a set of word 5-gram shingles of its normalized text (lowercase, digits -> 0, punctuation
removed, whitespace collapsed), each hashed to 32 bits. A signature keeps, for each of num_perm random hash
functions h_i(x) = (a_i * x + b_i) mod 2**32 (a_i odd, so h_i is a permutation of the 32-bit space), the smallest
h_i over the document's shingles. Two signatures agree in a position with probability ~ Jaccard(A, B), so the
fraction of equal positions estimates the Jaccard similarity. LSH cuts a signature into `bands` bands of `rows`
values; two documents that agree on a whole band become a candidate pair, which happens with probability
1 - (1 - s**rows)**bands at similarity s (0.56 / 0.92 / 0.99 at s = 0.70 / 0.80 / 0.85 for 14 x 8).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

EMPTY = np.uint32(0xFFFFFFFF)  # the signature value of a document with no shingles
# ASCII punctuation and digits are mapped by a byte table; these catch the non-ASCII ones
_PUNCT = re.compile(r"[^\w\s\x00-\x7f]")
_DIGIT = re.compile(r"[\u0660-\u0669\u06f0-\u06f9\u0966-\u096f\u09e6-\u09ef\uff10-\uff19]")
# combining marks (the diacritics NFKD splits off): one regex pass instead of a Python loop over characters
_COMBINING = re.compile("[\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u0900-\u0903"
                        "\u093a-\u094f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\u302a-\u302f\u3099\u309a"
                        "\ufe20-\ufe2f]")
_M64 = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants for mixing (golden ratio, splitmix64)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def normalize_for_shingles(text: str) -> str:
    """Lowercase, strip diacritics, digits -> 0, punctuation -> space, whitespace collapsed (FineWeb's recipe)."""
    return " ".join(bytes(_normalized_bytes(text)).decode("utf-8", "replace").split())


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint8)
    for c in range(128):
        ch = chr(c)
        if ch.isdigit():
            table[c] = ord("0")
        elif ch.isspace() or not (ch.isalnum()):
            table[c] = ord(" ")  # ASCII punctuation, control characters and whitespace all separate words
        else:
            table[c] = ord(ch.lower())
    return table


_TABLE = _byte_table()
_B = 0x100000001B3  # odd base of the polynomial word hash (the FNV prime)
_BINV = pow(_B, -1, 2**64)
_pow_cache: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """B**k and B**-k mod 2**64 for k < n (grown on demand, wrapping uint64 products)."""
    if len(_pow_cache.get("b", ())) < n:
        m = max(n, 1 << 16, 2 * len(_pow_cache.get("b", ())))
        with np.errstate(over="ignore"):
            one = np.ones(1, dtype=np.uint64)  # (a plain [1] would promote the uint64 products to float64)
            _pow_cache["b"] = np.concatenate([one, np.cumprod(np.full(m - 1, _B, dtype=np.uint64))])
            _pow_cache["binv"] = np.concatenate([one, np.cumprod(np.full(m - 1, _BINV, dtype=np.uint64))])
    return _pow_cache["b"][:n], _pow_cache["binv"][:n]


def _normalized_bytes(text: str) -> np.ndarray:
    text = text.lower()
    if not text.isascii():  # the slow path only for non-ASCII text: strip diacritics, Unicode punctuation
        text = unicodedata.normalize("NFKD", text)
        text = _PUNCT.sub(" ", _COMBINING.sub("", text))
        text = _DIGIT.sub("0", text)
    return _TABLE[np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)]


def _mix32(x: np.ndarray) -> np.ndarray:
    """A uint64 array mixed down to well-spread uint32 values (splitmix64 finalizer, high half)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)).astype(np.uint32)


def shingle_hashes64(text: str, ngram: int = 5, short_as_one: bool = True) -> np.ndarray:
    """64-bit hashes of the word n-grams of the normalized text (for exact n-gram matching, e.g. decontamination).

    Vectorized: each word's hash is a polynomial hash of its bytes, read off prefix sums (no Python loop per word),
    and each n-gram's hash is a polynomial hash of its n word hashes, all in wrapping uint64 arithmetic. A text
    with fewer than n words gives one hash of all its words (short_as_one, the MinHash convention) or none; a text
    with no words gives none. Words are those of the normalized text: `a=b+c` is three words.
    """
    b = _normalized_bytes(text)
    if b.size == 0:
        return np.empty(0, dtype=np.uint64)
    is_word = b != 32
    edges = np.diff(np.concatenate([[False], is_word, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.empty(0, dtype=np.uint64)
    if not short_as_one and starts.size < ngram:
        return np.empty(0, dtype=np.uint64)
    bpow, binv = _powers(b.size + 1)
    with np.errstate(over="ignore"):
        g = np.zeros(b.size + 1, dtype=np.uint64)
        np.cumsum((b.astype(np.uint64) + np.uint64(1)) * binv[: b.size], out=g[1:])
        w = (g[ends] - g[starts]) * bpow[ends - 1]  # sum of c_k * B**(end-1-k) over the word's bytes
        n = min(ngram, len(w))
        m = len(w) - n + 1
        acc = np.zeros(m, dtype=np.uint64)
        for j in range(n):
            acc = acc * _M64 + w[j : j + m]
        acc ^= acc >> np.uint64(30)
        acc *= _MIX
        acc ^= acc >> np.uint64(31)
    return acc


def shingles(text: str, ngram: int = 5) -> np.ndarray:
    """uint32 hashes of the word n-grams of the normalized text (the high half of shingle_hashes64)."""
    return (shingle_hashes64(text, ngram) >> np.uint64(32)).astype(np.uint32)


def _hash_items(items: Iterable) -> np.ndarray:
    """A shingle set given as strings or integers -> uint32 hashes (strings by crc32, integers mixed)."""
    items = list(items)
    if not items:
        return np.empty(0, dtype=np.uint32)
    if isinstance(items[0], str):
        return np.array([zlib.crc32(s.encode("utf-8", "surrogatepass")) for s in items], dtype=np.uint32)
    if isinstance(items[0], bytes):
        return np.array([zlib.crc32(s) for s in items], dtype=np.uint32)
    arr = np.asarray(items)
    if arr.dtype == np.uint32:
        return arr
    if arr.dtype.kind not in "iu":
        raise TypeError(f"a shingle set must hold str, bytes or integers, not {arr.dtype}")
    return _mix32((arr.astype(np.int64)).view(np.uint64) if arr.dtype.kind == "i" else arr.astype(np.uint64))


def permutations(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) uint32 parameters of the num_perm hash functions h_i(x) = (a_i * x + b_i) mod 2**32, a_i odd."""
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def signatures_from_hashes(hash_sets: Sequence[np.ndarray], num_perm: int = 112, seed: int = 0,
                           chunk: int = 4096) -> np.ndarray:
    """MinHash signatures (n_docs, num_perm) uint32 of documents given as uint32 shingle-hash arrays."""
    a, b = permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    n = len(hash_sets)
    sig = np.full((n, num_perm), EMPTY, dtype=np.uint32)
    lengths = np.array([len(h) for h in hash_sets], dtype=np.int64)
    # Docs are packed into blocks of ~chunk shingles; one (num_perm, chunk) block of hash values fits in cache and
    # is reduced along its contiguous last axis, one segment per doc. A longer doc is split over several blocks.
    i = 0
    while i < n:
        if lengths[i] == 0:
            i += 1
            continue
        if lengths[i] >= chunk:
            h = hash_sets[i]
            row = sig[i]
            for s in range(0, len(h), chunk):
                x = h[None, s : s + chunk] * a
                x += b
                np.minimum(row, x.min(axis=1), out=row)
            i += 1
            continue
        j, total = i, 0
        while j < n and 0 < lengths[j] < chunk and total + lengths[j] <= chunk:
            total += lengths[j]
            j += 1
        x = np.concatenate([hash_sets[k] for k in range(i, j)])[None, :] * a
        x += b
        starts = np.concatenate([[0], np.cumsum(lengths[i : j - 1])])
        sig[i:j] = np.minimum.reduceat(x, starts, axis=1).T
        i = j
    return sig


def minhash_signatures(docs: Sequence, num_perm: int = 112, seed: int = 0, ngram: int = 5) -> np.ndarray:
    """MinHash signatures, shape (n_docs, num_perm), dtype uint32.

    docs: texts (shingled into word `ngram`-grams of the normalized text) or shingle sets (iterables of str, bytes
    or integers). The same (num_perm, seed) always gives the same hash functions, so signatures are comparable
    across calls. A document with no shingles gets all 0xFFFFFFFF and is never clustered.
    """
    hash_sets = [shingles(d, ngram) if isinstance(d, str) else _hash_items(d) for d in docs]
    return signatures_from_hashes(hash_sets, num_perm, seed)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of positions where two signatures agree: an unbiased estimate of Jaccard similarity."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


def jaccard(a, b, ngram: int = 5) -> float:
    """Exact Jaccard similarity |A & B| / |A | B| of two shingle sets, or of two texts' shingle sets."""
    if isinstance(a, str):
        a = set(shingles(a, ngram).tolist())
    if isinstance(b, str):
        b = set(shingles(b, ngram).tolist())
    a, b = set(a), set(b)
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def match_probability(s: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard similarity s share at least one LSH band."""
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_candidate_pairs(sig: np.ndarray, bands: int = 14, rows: int = 8, max_bucket: int = 200) -> np.ndarray:
    """Pairs (i, j), i < j, of documents whose signatures agree on at least one whole band; shape (n_pairs, 2).

    A bucket larger than max_bucket (many copies of one text) contributes a star (every member paired with the
    first) instead of all k*(k-1)/2 pairs: clusters come out the same, the work stays linear.
    """
    n, num_perm = sig.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands x rows = {bands} x {rows} = {bands * rows} needs at least that many permutations, "
                         f"but the signatures have {num_perm}")
    live = np.flatnonzero(~(sig == EMPTY).all(axis=1))  # empty documents never match
    pairs = []
    for k in range(bands):
        band = np.ascontiguousarray(sig[live, k * rows : (k + 1) * rows])
        _, inverse, counts = np.unique(band.view(np.dtype((np.void, 4 * rows))).ravel(),
                                       return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        shared = counts[inverse] > 1
        if not shared.any():
            continue
        docs, keys = live[shared], inverse[shared]
        order = np.argsort(keys, kind="stable")
        docs, keys = docs[order], keys[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for group in np.split(docs, bounds):
            if len(group) > max_bucket:
                pairs.append(np.stack([np.full(len(group) - 1, group[0]), group[1:]], axis=1))
            else:
                i, j = np.triu_indices(len(group), k=1)
                pairs.append(np.stack([group[i], group[j]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    allp = np.concatenate(pairs).astype(np.int64)
    allp.sort(axis=1)
    return np.unique(allp, axis=0)


def near_duplicate_clusters(sig: np.ndarray, bands: int = 14, rows: int = 8,
                            threshold: float | None = None) -> list[list[int]]:
    """Clusters of near-duplicate documents from their MinHash signatures: LSH candidates, then greedy clusters
    around kept representatives.

    Documents are visited in index order; each joins the first representative it is a near-duplicate of, or else
    becomes one. "Near-duplicate of r" means: estimated Jaccard with r (fraction of equal signature values) at
    least `threshold`, or, with threshold None, sharing a whole LSH band with r. The representatives tried for a
    document are those of its LSH candidates. So every dropped document is close to the document kept, not merely
    chained to it: in A~B~C with A and C far apart, B joins A and C is kept (union-find would drop C).

    Returns clusters of size >= 2, each a sorted list of row indices whose first is the representative, ordered
    by it; keeping the first of each cluster dedups the set.
    """
    sig = np.asarray(sig)
    if sig.ndim != 2:
        raise ValueError(f"signatures must be a 2-D array (n_docs, num_perm), got shape {sig.shape}")
    pairs = lsh_candidate_pairs(sig, bands, rows)
    bands_of = sig[:, : bands * rows].reshape(len(sig), bands, rows)

    def close(j: int, r: int) -> bool:
        if threshold is None:
            return bool((bands_of[j] == bands_of[r]).all(axis=1).any())
        return float(np.mean(sig[j] == sig[r])) >= threshold

    earlier: dict[int, list[int]] = {}
    for i, j in pairs.tolist():  # i < j: the pair is looked at when j is visited, after i was decided
        earlier.setdefault(j, []).append(i)
    rep_of: dict[int, int] = {}
    for j in sorted(earlier):
        for r in sorted({rep_of.get(i, i) for i in earlier[j]}):
            if close(j, r):
                rep_of[j] = r
                break
    groups: dict[int, list[int]] = {}
    for j, r in sorted(rep_of.items()):
        groups.setdefault(r, [r]).append(j)
    return [groups[r] for r in sorted(groups)]


def union_find_clusters(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (size >= 2) of the graph on n nodes with the given edges, as sorted index lists.

    (Not used for dedup: a component can chain documents that are far apart; see near_duplicate_clusters.)"""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), []).append(x)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
