# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week17/01_data_curation.ipynb)
#
# # Week 17 · 01 — From raw text to a training corpus
#
# What a model learns is decided by what it reads. This notebook walks the `dataset_curation` pipeline on the
# built-in corpus (the Python standard library of this interpreter: its code, and its docstrings and comments as
# English prose): what the documents look like, what quality rules throw away, how MinHash finds near-duplicates,
# the data dir the pipeline writes, and how validation text is kept out of training. Days 1 and 2 of the course
# ([week17.md](../../course/week17.md)).

# %%
# Setup. On Colab only: clone the course repository and install it (Colab's own torch is kept, never
# replaced). Locally, install once with `pip install -e ".[dev]"` from the repository root (see README).
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules:
    if not Path("/content/llm-training-from-scratch").is_dir():
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/llm-course/llm-training-from-scratch", "/content/llm-training-from-scratch"],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/llm-training-from-scratch[metrics,serve]"],
                       check=True)
    os.chdir("/content/llm-training-from-scratch/notebooks/week17")
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the packages import even without an editable install
print("repository:", ROOT)

# %%
FAST = True  # True: small and quick on a 2-core CPU, downloads nothing. False: the full run (use a GPU).
SEED = 0

import random

import matplotlib.pyplot as plt
import numpy as np
import torch

random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)
if FAST:  # the Hugging Face libraries fail at once instead of trying the network
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# %matplotlib inline
from course.nb import show  # displays the current figure inline, even after a package switched matplotlib to Agg

print(f"FAST={FAST}, device={DEVICE}, torch {torch.__version__}")

# %% [markdown]
# ## 1. The raw documents
#
# Every document carries its source, path, licence and kind (code or prose). `FAST` reads a subset of the
# files; the full corpus is about 1,800 files and 30 MB.

# %%
import collections
import json

from course import check, nb
from dataset_curation import filters, sources

docs, manifest = sources.builtin_documents(max_files=120 if FAST else None)
print({k: manifest[k] for k in ("python", "files", "bytes", "license") if k in manifest})
print(collections.Counter(d["kind"] for d in docs), "documents")
lengths = {kind: [len(d["text"]) for d in docs if d["kind"] == kind] for kind in ("code", "prose")}
bins = np.logspace(1, 6, 40)
plt.figure(figsize=(6, 3))
for kind, ls in lengths.items():
    plt.hist(ls, bins=bins, alpha=0.6, label=f"{kind} ({len(ls)})")
plt.xscale("log"); plt.xlabel("characters per document"); plt.ylabel("documents"); plt.legend()
show()
sample = random.Random(SEED).choice([d for d in docs if d["kind"] == "prose"])
print(sample["id"], "\n", sample["text"][:400])

# %% [markdown]
# ## 2. Quality filters
#
# Web-scale pipelines drop documents by simple, published rules. The Gopher *quality* rules look at word
# counts, word length, symbols, bullet and ellipsis lines, the share of real words and a handful of English
# stop words; the *repetition* rules at repeated lines, paragraphs and n-grams. Each returns the reason a
# document fails, or `None` to keep it. Try them on documents made to fail:

# %%
made_up = {
    "real prose": sample["text"],
    "too short": "Click here to continue.",
    "symbol soup": "#### ### ## # " * 30 + " the and of to that with",
    "bullet list": "\n".join(f"- item number {i} of the list" for i in range(60)),
    "repetitive": "buy the best shoes and the best bags today with us " * 40,
}
for name, text in made_up.items():
    print(f"{name:12s} quality: {str(filters.gopher_quality(text)):28s} "
          f"repetition: {filters.gopher_repetition(text)}")

# %% [markdown]
# ### Exercise 1 — the repeated-lines rule
#
# One of Gopher's repetition rules, by hand. Write `my_dup_lines(text)` returning two numbers: the fraction of
# lines that repeat an earlier line, and the fraction of the lines' characters that sit in those repeats. Strip
# each line and leave out the empty ones first; the first copy of a line is not a repeat. Gopher drops a
# document when the first is above 0.30 or the second above 0.20.

# %%
# YOUR CODE: my_dup_lines
def my_dup_lines(text):
    """(fraction of non-empty stripped lines that repeat an earlier one, fraction of their characters)."""
    raise NotImplementedError("split on '\\n', strip, drop empty lines, then walk them keeping a set of lines seen")


# %%
result = check.dup_lines(my_dup_lines)
if result:
    for name, text in made_up.items():
        lines, chars = my_dup_lines(text)
        print(f"{name:12s} repeated lines {lines:.2f}, their characters {chars:.2f}")

# %% [markdown]
# Code is not prose: a Python file has few stop words and many symbols, so prose rules would throw all code
# away. The pipeline applies code-aware rules to code (line lengths, the share of alphanumeric characters,
# generated-file markers) — see `dataset_curation/filters.py`.
#
# ## 3. Near-duplicates with MinHash
#
# Exact deduplication (hashing the normalised text) misses documents that differ by a few words. The standard
# library has a real case: the codec tables `encodings/cp*.py` are generated from one template. To compare
# documents, cut each into word 5-gram *shingles* and use the Jaccard similarity |A ∩ B| / |A ∪ B|. Comparing
# all pairs exactly is quadratic; **MinHash** summarises each document by the minimum of each of `num_perm`
# random hash functions over its shingles. Two signatures agree in a position with probability equal to the
# Jaccard similarity:

# %%
from itertools import combinations

from dataset_curation.minhash import jaccard, minhash_signatures, near_duplicate_clusters, shingles

root = sources.stdlib_root()
paths = sorted((root / "encodings").glob("cp*.py"))[: 10 if FAST else None]
paths += [root / name for name in ("textwrap.py", "string.py", "bisect.py", "colorsys.py", "shlex.py")]
texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
names = [p.name for p in paths]
sets = [set(shingles(t).tolist()) for t in texts]
sig = minhash_signatures(texts, num_perm=112, seed=SEED)
pairs = list(combinations(range(len(texts)), 2))
exact = [jaccard(sets[i], sets[j]) for i, j in pairs]
est = [float((sig[i] == sig[j]).mean()) for i, j in pairs]
plt.figure(figsize=(4, 4))
plt.scatter(exact, est, s=12); plt.plot([0, 1], [0, 1], color="grey", lw=0.8)
plt.xlabel("exact Jaccard"); plt.ylabel("MinHash estimate (112 hashes)"); show()
print(f"{len(pairs)} pairs, mean |estimate - exact| = {np.mean(np.abs(np.subtract(est, exact))):.3f}")

# %% [markdown]
# **LSH** avoids comparing every pair of signatures: cut each signature into `b` bands of `r` rows and call two
# documents candidates when any band matches exactly. The chance of that is `1 - (1 - s^r)^b` at similarity
# `s`: an S-curve whose steep part sits near the threshold you want (FineWeb uses 14 bands × 8 rows).

# %%
from dataset_curation.minhash import match_probability

s_grid = np.linspace(0, 1, 101)
plt.figure(figsize=(5, 3))
for b, r in [(14, 8), (20, 5), (9, 12)]:
    plt.plot(s_grid, [match_probability(s, b, r) for s in s_grid], label=f"{b} bands x {r} rows")
plt.xlabel("Jaccard similarity"); plt.ylabel("P(candidate pair)"); plt.legend(); show()

clusters = near_duplicate_clusters(sig, bands=14, rows=8, threshold=0.7)
for c in clusters:
    print("near-duplicate cluster:", [names[i] for i in c])
print("keep the first of each cluster; documents in no cluster are kept as they are")


# %% [markdown]
# ### Exercise 2 — MinHash signatures
#
# Write `my_minhash(shingle_sets, num_perm, seed)` returning a numpy array of shape
# `(len(shingle_sets), num_perm)`: for each of `num_perm` hash functions (e.g. `(a * h(x) + b) mod p` with
# random `a, b` drawn from `seed`, and `h` a fixed hash of the shingle string such as `zlib.crc32`), the
# minimum over the set. The check builds set pairs with known Jaccard similarity and compares your estimates
# with the exact values and with the package's.

# %%
# YOUR CODE: my_minhash
def my_minhash(shingle_sets, num_perm, seed):
    """A numpy array (len(shingle_sets), num_perm): per set, the minimum of each hash function over its shingles."""
    raise NotImplementedError("draw a, b for (a * h + b) % p from np.random.default_rng(seed); h = zlib.crc32(s.encode())")


# %%
check.minhash(my_minhash)

# %% [markdown]
# ### Exercise 3 — LSH banding
#
# Write `my_lsh_candidates(sig, bands, rows)`: the set of pairs `(i, j)`, `i < j`, whose signatures agree on every
# value of at least one band (band `k` is columns `k*rows` to `(k+1)*rows - 1`). Put each document in a bucket
# keyed by its band's values, one dict per band, and pair up the documents that share a bucket.

# %%
# YOUR CODE: my_lsh_candidates
def my_lsh_candidates(sig, bands, rows):
    """Pairs (i, j), i < j, of rows of sig (n_docs, num_perm) equal on some whole band."""
    raise NotImplementedError("for each band: a dict from tuple(sig[doc, band columns]) to the docs in that bucket")


# %%
result = check.lsh_candidates(my_lsh_candidates)
lsh = check.pick(result, my_lsh_candidates)

# %% [markdown]
# ### Exercise 4 — clusters
#
# Candidate pairs chain: if A is near B and B near C, all three are one cluster, and dedup keeps one of them.
# Write `my_clusters(n, pairs)`: the connected components with at least two members (union-find: each document
# points to a parent; joining two clusters points one root at the other).

# %%
# YOUR CODE: my_clusters
def my_clusters(n, pairs):
    """Lists of document indices, one per connected component of size >= 2."""
    raise NotImplementedError("parent = list(range(n)); find(x) follows parents to the root; union sets one root's parent")


# %%
result = check.clusters(my_clusters)
cluster_fn = check.pick(result, my_clusters)
for c in cluster_fn(len(texts), sorted(lsh(sig, 14, 8))):
    print("your LSH + clusters:", sorted(names[i] for i in c))

# %% [markdown]
# ### Exercise 5 — choosing bands x rows
#
# With `num_perm` hashes you may use any `bands * rows <= num_perm`. Which is best for a target threshold `t`?
# Count the damage: false positives are pairs below `t` that become candidates (area under the S-curve left of
# `t`), false negatives pairs above `t` that do not (area above the curve right of `t`). Write
# `my_choose_bands(num_perm, threshold)` returning the `(bands, rows)` with the least total area (integrate with
# the trapezoid rule; `check.band_cost(b, r, t)` is the check's version of that sum).

# %%
# YOUR CODE: my_choose_bands
def my_choose_bands(num_perm, threshold):
    """(bands, rows), bands * rows <= num_perm, minimising false-positive + false-negative probability mass."""
    raise NotImplementedError("try every b and r <= num_perm // b; cost = area of P(s) below t + area of 1 - P(s) above t")


# %%
result = check.choose_bands(my_choose_bands)
choose = check.pick(result, my_choose_bands)
plt.figure(figsize=(5, 3))
for t in (0.5, 0.7, 0.85):
    b, r = choose(112, t)
    plt.plot(s_grid, [match_probability(s, b, r) for s in s_grid], label=f"t={t}: {b} bands x {r} rows")
    plt.axvline(t, color="grey", lw=0.5)
plt.xlabel("Jaccard similarity"); plt.ylabel("P(candidate pair)"); plt.title("S-curves chosen for 112 hashes")
plt.legend(); show()

# %% [markdown]
# ## 4. The whole pipeline
#
# `dataset_curation.pipeline.build` runs every stage — normalise, quality filters, PII masking, exact dedup,
# MinHash dedup, train/validation split by document, decontamination, tokenizer training, token shards — and
# records, for each stage, documents and characters in, kept and removed by reason (in = kept + removed,
# always). `FAST` builds a small subset (a few seconds); the full built-in corpus takes a few minutes:
# `python -m dataset_curation build --recipe builtin --out data/builtin-8k`.

# %%
data_dir = nb.data_dir(FAST)
stats = json.loads((data_dir / "stats.json").read_text())
for st in stats["stages"]:
    print(f"{st['name']:14s} in {st['docs_in']:5d}  kept {st['docs_kept']:5d}  removed {st['docs_removed']:4d} "
          f"{st['removed'] or ''}")
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar([st["name"] for st in stats["stages"]], [st["docs_kept"] for st in stats["stages"]])
ax.set_ylabel("documents kept"); plt.xticks(rotation=30, ha="right"); show()
meta = json.loads((data_dir / "meta.json").read_text())
print(f"tokens: {meta['tokens']}, vocab {meta['vocab_size']}, {stats['bytes_per_token']} bytes/token")

# %% [markdown]
# A learner should *look* at what was thrown away before trusting a filter. The pipeline keeps a sample of
# removed documents per reason:

# %%
removed = json.loads((data_dir / "removed_samples.json").read_text())
for stage, reasons in removed.items():
    for reason, items in reasons.items():
        print(f"[{stage} / {reason}] {items[0]['id']}: {items[0]['text'][:160]!r}")

# %%
from IPython.display import Image, display

for png in sorted((data_dir / "plots").glob("*.png"))[:3]:
    print(png.name)
    display(Image(filename=str(png), width=520))

# %% [markdown]
# ## 5. Decontamination: keep the test out of the training set
#
# A score on text the model trained on measures memory, not skill. Once documents are split into train and
# validation, some training documents can still carry validation text: a file copied into another module, a
# docstring pasted twice. Stage 8 of the pipeline finds them by word n-grams of the normalized text (the same
# normalization as MinHash: lowercase, accents stripped, digits to 0, anything that is not a letter or a digit
# separating words). A training document goes when at least `min_fraction` of its n-gram positions (10% by
# default) occur in a validation document: one shared idiom is not a leak, a half-copied file is. Against an
# explicit benchmark (`eval_texts`, the pipeline's `eval_files` parameter), one shared n-gram is enough (GPT-3's
# rule, with n = 13).
#
# ### Exercise 6 — decontamination
#
# Write `my_decontaminate(docs, stats, eval_texts, ngram, min_fraction)` with the contract of
# `dataset_curation.dedup.decontaminate`: `docs` are dicts with `"id"`, `"text"` and `"split"`; return the kept
# documents in order, calling `stats.keep(len(doc["text"]), doc)` for each kept one (val documents are always
# kept) and `stats.remove(doc, reason, note)` with reason `"contaminated_eval"` (any n-gram in an evaluation
# text) or else `"overlaps_val"` (hits / n-gram positions >= min_fraction). Build n-grams inside each text, never
# across two texts; a text with fewer than `ngram` words has none.

# %%
# YOUR CODE: my_decontaminate
def my_decontaminate(docs, stats, eval_texts=(), ngram=13, min_fraction=0.1):
    """The documents kept by stage 8: no evaluation n-gram, and under min_fraction of their n-grams in val."""
    raise NotImplementedError("normalize, one set of n-gram tuples per kind of held-out text, then count per document")


# %%
result = check.decontaminate(my_decontaminate)
decontaminate = check.pick(result, my_decontaminate)

# %% [markdown]
# Now on the real corpus: section 1's documents through exact dedup, MinHash dedup and the split by file (stages 4,
# 5 and 7, as the pipeline runs them), then your function at several n:

# %%
from dataset_curation import dedup, stages
from dataset_curation.minhash import normalize_for_shingles
from dataset_curation.stages import StageStats

grouped = [{**d, "group": d["path"]} for d in docs]  # a file's code and its prose land in the same split
unique = list(dedup.exact_dedup(grouped, StageStats("exact_dedup")))
unique, _ = dedup.near_dedup(unique, StageStats("near_dedup"))
split_docs = stages.split_train_val(unique, StageStats("split"), val_fraction=0.1, seed=SEED)
print(collections.Counter(d["split"] for d in split_docs))
for n in (8, 13, 20, 50):
    st = StageStats("decontaminate")
    decontaminate(split_docs, st, (), n, 0.1)
    print(f"n={n:2d}: {st.removed.get('overlaps_val', 0)} training documents share >= 10% of their n-grams with val")
st = StageStats("decontaminate")
kept = decontaminate(split_docs, st, (), 13, 0.1)
for item in st.samples.get("overlaps_val", []):
    print("removed:", item["id"], "-", item["note"])
stage8 = next(s for s in stats["stages"] if s["name"] == "decontaminate")
print("the pipeline's stage 8 on the FAST data dir (after the quality filters too):", stage8["removed"] or "none")

# %% [markdown]
# What does the leak do to a score? Take the purest memoriser there is: a table from every 12 words of the
# training split to the word that followed them, and let it predict each next word of the validation split.
# It cannot generalise at all, so every word it gets right is one it saw:

# %%
K = 12
val_words = {d["id"]: normalize_for_shingles(d["text"]).split() for d in split_docs if d["split"] == "val"}


def lookup_table(train_docs):
    table = {}
    for d in train_docs:
        w = normalize_for_shingles(d["text"]).split()
        for i in range(len(w) - K):
            table[tuple(w[i:i + K])] = w[i + K]
    return table


def lookup_hits(table):
    """Per val document: (next words the table predicts right, positions)."""
    return {i: (sum(table.get(tuple(w[j:j + K])) == w[j + K] for j in range(len(w) - K)), max(len(w) - K, 0))
            for i, w in val_words.items()}


before = lookup_hits(lookup_table([d for d in split_docs if d["split"] == "train"]))
after = lookup_hits(lookup_table([d for d in kept if d["split"] == "train"]))
share = lambda per: sum(h for h, _ in per.values()) / max(sum(n for _, n in per.values()), 1)
print(f"next-word accuracy of the memoriser on val: {share(before):.2%} with every training document, "
      f"{share(after):.2%} after decontamination")
worst = sorted(val_words, key=lambda i: -before[i][0] / max(before[i][1], 1))[:5]
for i in worst:
    print(f"  {i:40s} {before[i][0] / max(before[i][1], 1):6.1%} -> {after[i][0] / max(after[i][1], 1):6.1%}")
plt.figure(figsize=(6, 2.6))
x = np.arange(len(worst))
plt.bar(x - 0.2, [before[i][0] / max(before[i][1], 1) for i in worst], 0.4, label="all training documents")
plt.bar(x + 0.2, [after[i][0] / max(after[i][1], 1) for i in worst], 0.4, label="decontaminated")
plt.xticks(x, [i.replace("stdlib-", "").replace("stdlib:", "") for i in worst], rotation=20, ha="right")
plt.ylabel("memoriser accuracy"); plt.title("the val documents it predicts best")
plt.legend(); show()

# %% [markdown]
# The documents your function removed are where the memoriser's "skill" on val came from: with them gone, what
# is left is chance overlap (shared idioms, licence lines) spread thinly over many files. The same holds for a
# neural model: its validation loss and completion scores would be flattered on exactly those files.
# Notebook 06 builds its completion task from validation files only and drops any example whose prompt occurs
# in a training file, for the same reason.

# %% [markdown]
# **Task 1** ([course/README.md](../../course/README.md)): build your data dir —
# `python -m dataset_curation build --recipe builtin --out data/builtin-8k` on a CPU, or the `wiki_code` recipe
# with a 100M-token target on a machine with internet — read its `report.md`, and check
# `python -m course status`.
#
# Next: [02_tokenization.ipynb](02_tokenization.ipynb).
