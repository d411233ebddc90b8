"""Benchmarks, ours vs the libraries, one run, printed as a table:

    python -m dataset_curation.bench                 # ~1-2 minutes on 2 cores
    python -m dataset_curation.bench --docs 1000 --bpe_chars 200000   # quicker

1. Near-duplicate detection: our numpy MinHash + LSH vs `datasketch` (MinHash + MinHashLSH), on the same
   documents (random-word base documents plus planted near-copies at a range of similarities), the same number
   of permutations and the same bands x rows. Recall = share of the truly similar pairs (exact Jaccard of the
   5-gram shingle sets >= --jaccard) that come out as candidate pairs. Time covers text -> candidate pairs.
2. BPE: our from-scratch trainer vs `tokenizers` on the same text and vocab size: training time and bytes per
   token on held-out text (higher = better compression).
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from collections import defaultdict
from pathlib import Path

from dataset_curation.bpe import train_bpe
from dataset_curation.minhash import lsh_candidate_pairs, minhash_signatures, normalize_for_shingles, shingles
from dataset_curation.shards import train_tokenizer


def make_documents(n_docs: int, n_words: int, seed: int = 0) -> list[str]:
    """n_docs documents: 2/3 random-word bases, 1/3 copies of a base with 0-30% of their words replaced."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(20_000)]
    docs: list[str] = []
    while len(docs) < n_docs:
        base = [rng.choice(vocab) for _ in range(n_words)]
        docs.append(" ".join(base))
        if len(docs) % 2 == 0 and len(docs) < n_docs:
            w = list(base)
            for _ in range(int(n_words * rng.uniform(0.0, 0.3))):
                w[rng.randrange(n_words)] = rng.choice(vocab)
            docs.append(" ".join(w))
    return docs


def true_pairs(docs: list[str], threshold: float, ngram: int = 5) -> set[tuple[int, int]]:
    """All pairs with exact Jaccard >= threshold, via an inverted index (only pairs sharing a shingle are scored)."""
    sets = [set(shingles(d, ngram).tolist()) for d in docs]
    owners: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for h in s:
            owners[h].append(i)
    inter: dict[tuple[int, int], int] = defaultdict(int)
    for ids in owners.values():
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                inter[(ids[a], ids[b])] += 1
    return {p for p, n in inter.items() if n / (len(sets[p[0]]) + len(sets[p[1]]) - n) >= threshold}


def ours(docs: list[str], num_perm: int, bands: int, rows: int) -> set[tuple[int, int]]:
    sig = minhash_signatures(docs, num_perm=num_perm, seed=1)
    return {tuple(p) for p in lsh_candidate_pairs(sig, bands, rows).tolist()}


def theirs(docs: list[str], num_perm: int, bands: int, rows: int, ngram: int = 5) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    pairs = set()
    for i, d in enumerate(docs):
        words = normalize_for_shingles(d).split()
        grams = {" ".join(words[j : j + ngram]).encode() for j in range(max(len(words) - ngram + 1, 1))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(grams))
        for j in lsh.query(m):
            pairs.add((j, i))
        lsh.insert(i, m)
    return pairs


def stdlib_text(n_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= n_chars:
            break
    return "".join(parts)[:n_chars]


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process): on a shared machine CPU time is the fair measure."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--words", type=int, default=500)
    ap.add_argument("--num_perm", type=int, default=120)
    ap.add_argument("--bands", type=int, default=20)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--jaccard", type=float, default=0.8, help="pairs at or above this exact Jaccard must be found")
    ap.add_argument("--bpe_chars", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args(argv)

    rows = []
    docs = make_documents(args.docs, args.words)
    truth = true_pairs(docs, args.jaccard)
    ours_pairs, w_ours, t_ours = timed(ours, docs, args.num_perm, args.bands, args.rows)
    their_pairs, w_theirs, t_theirs = timed(theirs, docs, args.num_perm, args.bands, args.rows)
    recall = lambda found: len(truth & found) / max(len(truth), 1)
    print(f"MinHash: {len(docs):,} docs x {args.words} words, {args.num_perm} permutations, {args.bands} bands x "
          f"{args.rows} rows; {len(truth):,} true pairs with Jaccard >= {args.jaccard}")
    rows.append(("MinHash+LSH CPU time (s)", f"{t_ours:.2f}", f"{t_theirs:.2f}", f"{t_theirs / t_ours:.1f}x faster"))
    rows.append(("  wall time (s)", f"{w_ours:.2f}", f"{w_theirs:.2f}", f"{w_theirs / w_ours:.1f}x faster"))
    rows.append(("  docs / CPU s", f"{len(docs) / t_ours:,.0f}", f"{len(docs) / t_theirs:,.0f}", ""))
    rows.append((f"  recall (J >= {args.jaccard})", f"{recall(ours_pairs):.3f}", f"{recall(their_pairs):.3f}", ""))
    rows.append(("  candidate pairs", f"{len(ours_pairs):,}", f"{len(their_pairs):,}", ""))

    text = stdlib_text(args.bpe_chars + args.bpe_chars // 5)
    train, held = text[: args.bpe_chars], text[args.bpe_chars :]
    mine, w_mine, t_mine = timed(train_bpe, train, args.vocab)
    # tokenizers trains on Rust threads, which process_time counts too (all threads of this process)
    lib, w_lib, t_lib = timed(train_tokenizer, [train], args.vocab)
    n = len(held.encode())
    bpt_mine = n / len(mine.encode(held))
    bpt_lib = n / len(lib.encode(held).ids)
    print(f"BPE: vocab {args.vocab:,}, trained on {len(train.encode()) / 1e6:.2f} MB of stdlib source, "
          f"compression measured on {n / 1e3:.0f} kB held out\n")
    rows.append(("BPE train CPU time (s)", f"{t_mine:.2f}", f"{t_lib:.2f}", f"{t_mine / t_lib:.2f}x its time"))
    rows.append(("  wall time (s)", f"{w_mine:.2f}", f"{w_lib:.2f}", f"{w_mine / w_lib:.2f}x its time"))
    rows.append(("  bytes / token (held out)", f"{bpt_mine:.3f}", f"{bpt_lib:.3f}", f"{bpt_mine / bpt_lib:.3f}"))

    widths = [max(len(r[i]) for r in rows + [("task", "ours", "reference", "ratio")]) for i in range(4)]
    head = ("task", "ours", "datasketch / tokenizers", "ratio")
    widths[2] = max(widths[2], len(head[2]))
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    ok_speed, ok_recall, ok_bpe = t_theirs / t_ours >= 3, recall(ours_pairs) >= 0.95, t_mine < 10
    print(f"\ngoals (CPU time): recall >= 0.95 {'OK' if ok_recall else 'MISSED'}; >= 3x faster than datasketch "
          f"{'OK' if ok_speed else 'MISSED'}; BPE vocab {args.vocab} on {args.bpe_chars / 1e6:.1f} MB in < 10 s "
          f"{'OK' if ok_bpe else 'MISSED'}")


if __name__ == "__main__":
    main()
