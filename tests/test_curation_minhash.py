"""MinHash + LSH from scratch: estimates against exact Jaccard, LSH recall on planted near-duplicates, clusters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dataset_curation.minhash import (
    jaccard,
    lsh_candidate_pairs,
    match_probability,
    minhash_signatures,
    near_duplicate_clusters,
    normalize_for_shingles,
    shingles,
    union_find_clusters,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_words(rng: random.Random, n: int, vocab: list[str]) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def make_vocab(rng: random.Random, n: int = 3000) -> list[str]:
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def mutate(words: list[str], rate: float, rng: random.Random, vocab: list[str]) -> list[str]:
    w = list(words)
    for _ in range(int(len(w) * rate)):
        w[rng.randrange(len(w))] = rng.choice(vocab)
    return w


def test_normalization_and_shingles():
    assert normalize_for_shingles("Hello, WORLD!  It's 2024 -- café") == "hello world it s 0000 cafe"
    assert len(shingles("one two three four five six", 5)) == 2
    assert len(shingles("one two", 5)) == 1  # shorter than n: one shingle of everything
    assert len(shingles("  ,,, ", 5)) == 0
    # same normalized words, same shingles
    assert np.array_equal(shingles("A b, c d e!"), shingles("a B c  D e"))


@pytest.mark.parametrize("seed", [0, 1])
def test_estimates_match_exact_jaccard(seed):
    """On fresh random pairs across the similarity range: mean error ~0, each within 4 standard errors."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)
    num_perm = 256
    pairs = []
    for _ in range(60):
        base = random_words(rng, rng.randint(80, 300), vocab)
        pairs.append((" ".join(base), " ".join(mutate(base, rng.uniform(0, 0.3), rng, vocab))))
    sig = minhash_signatures([t for p in pairs for t in p], num_perm=num_perm, seed=seed)
    errors = []
    for k, (a, b) in enumerate(pairs):
        exact = jaccard(a, b)
        est = float(np.mean(sig[2 * k] == sig[2 * k + 1]))
        se = max(np.sqrt(exact * (1 - exact) / num_perm), 1 / num_perm)
        assert abs(est - exact) <= 4 * se + 1e-9, (k, exact, est)
        errors.append(est - exact)
    assert abs(np.mean(errors)) < 0.01  # unbiased
    spread = np.array([jaccard(a, b) for a, b in pairs])
    assert spread.min() < 0.3 and spread.max() > 0.8  # the test really covered the range


def test_signatures_accept_shingle_sets_and_are_deterministic():
    a, b = {"x", "y", "z", "w"}, {"x", "y", "z", "q"}
    s1 = minhash_signatures([a, b], num_perm=512, seed=3)
    s2 = minhash_signatures([a, b], num_perm=512, seed=3)
    assert s1.shape == (2, 512) and s1.dtype == np.uint32
    assert np.array_equal(s1, s2)
    assert abs(np.mean(s1[0] == s1[1]) - jaccard(a, b)) < 0.1  # 3/5 exact
    ints = minhash_signatures([[1, 2, 3], [1, 2, 3]], num_perm=16)
    assert np.array_equal(ints[0], ints[1])
    assert not np.array_equal(minhash_signatures([a], 64, seed=0), minhash_signatures([a], 64, seed=1))


def test_long_documents_are_split_over_blocks_correctly():
    rng = random.Random(5)
    vocab = make_vocab(rng)
    long_doc = " ".join(random_words(rng, 20_000, vocab))  # more shingles than one block
    short = [" ".join(random_words(rng, 50, vocab)) for _ in range(30)]
    together = minhash_signatures(short[:10] + [long_doc] + short[10:], num_perm=64)
    alone = np.vstack([minhash_signatures([d], num_perm=64) for d in short[:10] + [long_doc] + short[10:]])
    assert np.array_equal(together, alone)


def test_lsh_recall_on_planted_near_duplicates():
    """Planted pairs with Jaccard >= 0.8 are found (14 x 8 bands: P(found) >= 0.92 each); random docs are not."""
    rng = random.Random(7)
    vocab = make_vocab(rng, 5000)
    docs, planted = [], []
    for i in range(150):
        base = random_words(rng, 200, vocab)
        docs.append(" ".join(base))
        if i % 3 == 0:
            dup = " ".join(mutate(base, 0.01, rng, vocab))
            planted.append((len(docs) - 1, len(docs)))
            docs.append(dup)
    sig = minhash_signatures(docs, num_perm=112, seed=0)
    cand = {tuple(p) for p in lsh_candidate_pairs(sig, bands=14, rows=8).tolist()}
    high = [p for p in planted if jaccard(docs[p[0]], docs[p[1]]) >= 0.8]
    assert len(high) >= 40
    recall = sum(p in cand for p in high) / len(high)
    assert recall >= 0.95
    false = cand - set(planted)
    assert len(false) <= 2  # unrelated random documents share no band
    clusters = near_duplicate_clusters(sig, 14, 8, threshold=0.5)
    assert all(len(c) == 2 for c in clusters)
    assert sum(tuple(c) in set(planted) for c in clusters) >= 0.95 * len(high)


def test_match_probability_s_curve():
    assert abs(match_probability(0.8, 14, 8) - 0.92) < 0.01
    assert match_probability(0.3, 14, 8) < 0.01


def test_union_find_and_empty_documents():
    assert union_find_clusters(6, np.array([[0, 3], [3, 5], [1, 2]])) == [[0, 3, 5], [1, 2]]
    sig = minhash_signatures(["", "   ", "!!!", "same words here for all", "same words here for all"], 32)
    assert near_duplicate_clusters(sig, 8, 4) == [[3, 4]]  # empty docs never cluster
    with pytest.raises(ValueError, match="bands x rows"):
        near_duplicate_clusters(sig, 10, 4)


def test_agrees_with_datasketch_on_the_same_pairs():
    """Our estimate and datasketch's both track exact Jaccard; their disagreement is within sampling noise."""
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(11)
    vocab = make_vocab(rng)
    base = random_words(rng, 400, vocab)
    a, b = " ".join(base), " ".join(mutate(base, 0.05, rng, vocab))
    sa = set(shingles(a).tolist())
    sb = set(shingles(b).tolist())
    ma, mb = datasketch.MinHash(num_perm=256, seed=1), datasketch.MinHash(num_perm=256, seed=1)
    ma.update_batch([str(x).encode() for x in sa])
    mb.update_batch([str(x).encode() for x in sb])
    ours = minhash_signatures([sa, sb], num_perm=256, seed=1)
    exact = jaccard(sa, sb)
    assert abs(ma.jaccard(mb) - exact) < 0.12 and abs(float(np.mean(ours[0] == ours[1])) - exact) < 0.12


def test_a_chain_of_near_duplicates_keeps_the_far_end():
    # Shingle sets shifted along a line: A~B and B~C (Jaccard 0.74) but A and C are far apart (0.54). Union-find
    # over the pairs would drop C with A; only documents close to the one kept may go.
    from dataset_curation.dedup import near_dedup
    from dataset_curation.stages import StageStats

    sets = [range(0, 1000), range(150, 1150), range(300, 1300), range(5000, 6000)]  # A, B, C, unrelated D
    assert jaccard(sets[0], sets[1]) > 0.73 and jaccard(sets[1], sets[2]) > 0.73 and jaccard(sets[0], sets[2]) < 0.55
    sig = minhash_signatures([list(s) for s in sets], num_perm=512, seed=0)
    cand = {tuple(p) for p in lsh_candidate_pairs(sig, 32, 4).tolist()}
    assert {(0, 1), (1, 2)} <= cand  # the chain is there for union-find to follow
    assert near_duplicate_clusters(sig, 32, 4, threshold=0.65) == [[0, 1]]
    docs = [{"id": n, "text": n * 10} for n in "ABCD"]
    st = StageStats("near_dedup")
    kept, clusters = near_dedup(docs, st, bands=32, rows=4, threshold=0.65, signatures=sig)
    st.check()
    assert [d["id"] for d in kept] == ["A", "C", "D"] and clusters == [["A", "B"]]
    note = st.samples["near_duplicate"][0]["note"]
    assert note.startswith("cluster of A") and float(note.split("Jaccard ")[1].rstrip(")")) >= 0.65


def test_many_copies_form_one_cluster_around_the_first():
    # more copies than lsh_candidate_pairs' max_bucket (a star of pairs instead of all pairs): still one cluster
    sig = minhash_signatures([list(range(100, 400))] * 250 + [list(range(1000, 1300))], num_perm=112)
    assert near_duplicate_clusters(sig, 14, 8, threshold=0.7) == [list(range(250))]
