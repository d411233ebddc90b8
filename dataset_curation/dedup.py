"""Stages 4, 5 and 8: exact dedup, MinHash near-duplicate dedup, and decontamination against held-out text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from dataset_curation.minhash import near_duplicate_clusters, shingle_hashes64, shingles, signatures_from_hashes
from dataset_curation.stages import StageStats


def exact_key(text: str) -> bytes:
    """Identity of a document for exact dedup: its normalized text with whitespace runs collapsed."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8", "surrogatepass")).digest()


def exact_dedup(docs: Iterable[dict], stats: StageStats, seen: set | None = None) -> Iterator[dict]:
    """Stage 4. Keep the first document of every group with the same normalized text."""
    seen = set() if seen is None else seen
    first: dict[bytes, str] = {}
    for doc in docs:
        key = exact_key(doc["text"])
        if key in seen:
            stats.remove(doc, "exact_duplicate", f"same text as {first.get(key, 'an earlier document')}")
            continue
        seen.add(key)
        first[key] = doc["id"]
        yield stats.keep(len(doc["text"]), doc)


def doc_signatures(docs: list[dict], ngram: int = 5, num_perm: int = 112, seed: int = 0,
                   progress: bool = False) -> np.ndarray:
    """MinHash signatures (len(docs), num_perm) of the documents' texts."""
    hashes = [shingles(d["text"], ngram) for d in tqdm(docs, desc="minhash", disable=not progress, leave=False)]
    return signatures_from_hashes(hashes, num_perm, seed)


def near_dedup(docs: list[dict], stats: StageStats, ngram: int = 5, num_perm: int = 112, bands: int = 14,
               rows: int = 8, threshold: float = 0.7, seed: int = 0, signatures: np.ndarray | None = None,
               progress: bool = False) -> tuple[list[dict], list[list[str]]]:
    """Stage 5. MinHash + LSH near-duplicate clusters; keep the first document of each cluster.

    Returns (kept documents, clusters as lists of document ids, the kept one first). A document is removed only
    when its estimated Jaccard similarity with the document kept for its cluster is at least `threshold` (see
    minhash.near_duplicate_clusters): a chain of near-duplicates does not pull in documents far from the one kept.
    """
    if signatures is None:
        signatures = doc_signatures(docs, ngram, num_perm, seed, progress)
    if len(signatures) != len(docs):
        raise ValueError(f"{len(signatures)} signatures for {len(docs)} documents")
    clusters = near_duplicate_clusters(signatures, bands, rows, threshold)
    drop: dict[int, tuple[int, float]] = {}
    for cluster in clusters:
        keep = cluster[0]
        for i in cluster[1:]:
            drop[i] = (keep, float(np.mean(signatures[i] == signatures[keep])))
    kept = []
    for i, doc in enumerate(docs):
        if i in drop:
            k, est = drop[i]
            stats.remove(doc, "near_duplicate", f"cluster of {docs[k]['id']} (estimated Jaccard {est:.2f})")
        else:
            kept.append(stats.keep(len(doc["text"]), doc))
    stats.count("clusters", len(clusters))
    stats.count("docs_in_clusters", sum(map(len, clusters)))
    return kept, [[docs[i]["id"] for i in c] for c in clusters]


def _ngram_bank(texts: list[str], ngram: int) -> np.ndarray:
    # n-grams of normalized words (the same words ngram_hits counts); a text with fewer than n of them adds none
    grams = [shingle_hashes64(t, ngram, short_as_one=False) for t in texts]
    return np.unique(np.concatenate(grams)) if grams else np.empty(0, dtype=np.uint64)


def ngram_hits(docs: list[dict], bank: np.ndarray, ngram: int,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For every document: (its n-grams found in bank, its n-gram count); val documents and short ones get 0."""
    hits = np.zeros(len(docs), dtype=np.int64)
    sizes = np.zeros(len(docs), dtype=np.int64)
    if not bank.size:
        return hits, sizes
    batch: list[tuple[int, np.ndarray]] = []
    size = 0
    for i, doc in enumerate(tqdm(docs, desc="decontaminate", disable=not progress, leave=False)):
        # documents are chosen by their normalized words, the ones hashed: punctuation-dense code has far more
        # of them than whitespace-separated words
        g = shingle_hashes64(doc["text"], ngram, short_as_one=False) if doc.get("split") != "val" else None
        if g is not None and len(g):
            batch.append((i, g))
            sizes[i] = len(g)
            size += len(g)
        if batch and (size > 4_000_000 or i == len(docs) - 1):  # one isin per ~4M n-grams bounds memory
            owner = np.repeat([k for k, _ in batch], [len(g) for _, g in batch])
            found = np.isin(np.concatenate([g for _, g in batch]), bank)
            hits += np.bincount(owner[found], minlength=len(docs))
            batch, size = [], 0
    return hits, sizes


def decontaminate(docs: list[dict], stats: StageStats, eval_texts: Iterable[str] = (), ngram: int = 13,
                  min_fraction: float = 0.1, progress: bool = False) -> list[dict]:
    """Stage 8. Drop training documents that overlap held-out text in word `ngram`-grams (normalized text).

    Against explicit evaluation texts (eval_texts, e.g. a benchmark), one shared n-gram is enough (GPT-3's rule).
    Against the val split of the same corpus, a training document goes when at least min_fraction of its n-grams
    occur in val: a shared idiom is not a leak, a half-copied file is. Val documents are always kept.
    """
    eval_texts = list(eval_texts)
    val_bank = _ngram_bank([d["text"] for d in docs if d.get("split") == "val"], ngram)
    eval_bank = _ngram_bank(eval_texts, ngram)
    stats.count("val_ngrams", len(val_bank))
    stats.count("eval_ngrams", len(eval_bank))
    val_hits, sizes = ngram_hits(docs, val_bank, ngram, progress)
    eval_hits, _ = ngram_hits(docs, eval_bank, ngram)
    kept = []
    for doc, vh, eh, n in zip(docs, val_hits.tolist(), eval_hits.tolist(), sizes.tolist()):
        if eh > 0:
            stats.remove(doc, "contaminated_eval", f"{eh} {ngram}-grams shared with the evaluation texts")
        elif n and vh / n >= min_fraction:
            stats.remove(doc, "overlaps_val", f"{vh} of its {n} {ngram}-grams ({vh / n:.0%}) occur in val")
        else:
            kept.append(stats.keep(len(doc["text"]), doc))
    return kept
