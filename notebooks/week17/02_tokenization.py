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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week17/02_tokenization.ipynb)
#
# # Week 17 · 02 — Tokenization: BPE by hand and by library
#
# A model reads integers, not text. Byte-level BPE starts from the 256 byte values (so any string can be encoded)
# and learns merges of frequent neighbours. We train one by hand (`dataset_curation/bpe.py`), compare it with
# Hugging Face `tokenizers`, and look at the token shards a data dir holds. Day 3 of the course
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

# %%
import time

from course import check, nb
from dataset_curation import sources
from dataset_curation.bpe import BPETokenizer, pretokenize, train_bpe

docs, _ = sources.builtin_documents(max_files=60 if FAST else 400)
texts = [d["text"] for d in docs]
random.Random(SEED).shuffle(texts)
held_out = "\n".join(texts[:10])[:100_000]
train_text = "\n".join(texts[10:])[: 300_000 if FAST else 3_000_000]
print(f"training text: {len(train_text):,} characters; held-out: {len(held_out):,}")
s = "héllo wörld 🙂"
print(s, "->", list(s.encode("utf-8")), "(UTF-8 bytes: the starting alphabet)")
print("pre-tokens:", pretokenize("def add(a, b):  return a + b  # 42 apples"))

# %% [markdown]
# ## 1. Training BPE by hand
#
# Count every adjacent pair of tokens inside each pre-token (pre-tokens are words with their leading space,
# numbers, punctuation runs and whitespace, so merges never cross them), merge the most frequent pair into a
# new token, repeat. The first merges are the most common byte pairs of Python source:

# %%
t0 = time.perf_counter()
ours = train_bpe(train_text, vocab_size=512)
t_ours = time.perf_counter() - t0
print(f"trained {len(ours.merges)} merges in {t_ours:.2f} s")
print("first merges:", [ours.vocab[256 + r].decode("utf-8", "replace") for r in range(20)])
print("longest tokens:", sorted((t.decode("utf-8", "replace") for t in ours.vocab[256:]), key=len)[-8:])
example = "def forward(self, x):\n    return self.proj(x)<|endoftext|>"
ids = ours.encode(example)
print(len(example), "characters ->", len(ids), "tokens:", [ours.decode([i]) for i in ids])
assert ours.decode(ids) == example


# %% [markdown]
# ### Exercise 1 — the BPE trainer
#
# Write `my_train_bpe(text, num_merges)` returning the merges, a list of `(id, id)` pairs in the order learned.
# Use `pretokenize(text)`; start every pre-token from its UTF-8 bytes; count pairs weighted by how often each
# pre-token occurs; merge the most frequent pair (ties: the smallest pair) into id `256 + r`; stop early when no
# pair occurs twice. The check compares your merges with `train_bpe`'s one by one.

# %%
# YOUR CODE: my_train_bpe
def my_train_bpe(text, num_merges):
    """The merges, a list of (id, id) pairs in the order learned; merge r creates id 256 + r."""
    raise NotImplementedError("Counter(pretokenize(text)) gives each pre-token and how often it occurs; start from bytes")


# %%
check.bpe(my_train_bpe)

# %% [markdown]
# ### Exercise 2 — the BPE encoder
#
# Training learns the merges; encoding applies them to new text. Write `my_bpe_encode(text, merges)`: split with
# `pretokenize`, start each piece from its UTF-8 bytes, and repeatedly merge the adjacent pair with the **lowest
# rank** (the merge learned first) everywhere in the piece, until no adjacent pair is a merge. Merging the
# leftmost pair, or matching the longest token, gives different (and worse) tokenizations.

# %%
# YOUR CODE: my_bpe_encode
def my_bpe_encode(text, merges):
    """Token ids of text: per pre-token, apply the merges by rank (merge r is id 256 + r)."""
    raise NotImplementedError("rank = {pair: r for r, pair in enumerate(merges)}; merge the pair with the smallest rank")


# %%
result = check.bpe_encode(my_bpe_encode)
encode = check.pick(result, my_bpe_encode)
code = "def forward(self, x):\n    return self.proj(x)"
print(len(code.encode()), "bytes ->", len(encode(code, ours.merges)), "tokens with the 256 merges trained above")

# %% [markdown]
# ### Exercise 3 — an incremental trainer, and your task-1 tokenizer
#
# `my_train_bpe` recounts every pair in every pre-token before each merge, so its cost is (number of merges) x
# (size of the corpus): fine for 50 merges, far too slow for the 8,000 of a real vocabulary. But merging `(a, b)`
# changes only the words that contain `(a, b)`; every other count stays as it was. Write
# `my_train_bpe_incremental(text, num_merges)`: count the pairs once, remember which words hold each pair, and per
# merge visit only those words (take their old pairs out of the counts, merge, put their new pairs in). Find the
# most frequent pair with a heap rather than a scan of all counts. The merges must be exactly those of the
# recount (ties: the smallest pair), and the check times both on the same text.

# %%
# YOUR CODE: my_train_bpe_incremental
def my_train_bpe_incremental(text, num_merges):
    """The same merges as my_train_bpe, with the pair counts updated per merge instead of recounted."""
    raise NotImplementedError("count once; per merge, update only the words that contain the merged pair")


# %%
result = check.bpe_incremental(my_train_bpe_incremental)
train_merges = check.pick(result, my_train_bpe_incremental)

# %% [markdown]
# Now your trainer learns the vocabulary of task 1 (8,192 tokens for `tiny`: 256 bytes, the merges and the
# end-of-text token) from this notebook's training text, and your encoder tokenizes held-out text with it. Hugging
# Face `tokenizers`, handed the same merges and the same pre-tokens, must give the very same ids.

# %%
from course.check.tokenization import hf_encode

t0 = time.perf_counter()
task1_merges = train_merges(train_text, 8192 - 256 - 1)
t_train = time.perf_counter() - t0
print(f"{len(task1_merges):,} merges from {len(train_text):,} characters in {t_train:.1f} s"
      + (" (stopped early: no pair occurs twice any more)" if len(task1_merges) < 8192 - 257 else ""))
sample = held_out[: 20_000 if FAST else 100_000]
t0 = time.perf_counter()
my_ids = encode(sample, task1_merges)
t_enc = time.perf_counter() - t0
hf_ids = hf_encode(sample, task1_merges)
print(f"held-out sample: {len(sample.encode()):,} bytes -> {len(my_ids):,} tokens "
      f"({len(sample.encode()) / len(my_ids):.2f} bytes/token), encoded in {t_enc:.2f} s")
print("equal to HF tokenizers given the same merges:", my_ids == hf_ids)
assert my_ids == hf_ids

# %% [markdown]
# ## 2. The same with Hugging Face `tokenizers`
#
# The library implements the same algorithm in Rust. Compression is measured in bytes of text per token on
# held-out text: more bytes per token means shorter sequences, so more text fits the context and training is
# cheaper per byte.

# %%
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

def train_hf(text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok

n_bytes = len(held_out.encode("utf-8"))
sizes = [300, 512, 1024] if FAST else [512, 1024, 4096, 8192]
rows = []
for v in sizes:
    t0 = time.perf_counter(); mine = train_bpe(train_text, v); t1 = time.perf_counter()
    hf = train_hf(train_text, v); t2 = time.perf_counter()
    rows.append((v, n_bytes / len(mine.encode(held_out)), n_bytes / len(hf.encode(held_out).ids), t1 - t0,
                 t2 - t1))
    print(f"vocab {v:5d}: bytes/token ours {rows[-1][1]:.3f}, tokenizers {rows[-1][2]:.3f}; "
          f"training {rows[-1][3]:.2f} s vs {rows[-1][4]:.2f} s")
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].plot(sizes, [r[1] for r in rows], "o-", label="ours"); ax[0].plot(sizes, [r[2] for r in rows], "s--",
                                                                        label="tokenizers")
ax[0].set_xlabel("vocabulary size"); ax[0].set_ylabel("bytes per token (held out)"); ax[0].legend()
ax[1].plot(sizes, [r[3] for r in rows], "o-", label="ours (Python)")
ax[1].plot(sizes, [r[4] for r in rows], "s--", label="tokenizers (Rust)")
ax[1].set_xlabel("vocabulary size"); ax[1].set_ylabel("training seconds"); ax[1].legend()
show()

# %% [markdown]
# Same algorithm, same pre-tokenization idea: the compression comes out (nearly) the same; where the two
# differ, it is the pre-tokenizer's regex or the order in which ties between equally frequent pairs are
# broken. The speed gap is Python against Rust, and it grows with the corpus.
#
# ## 3. Special tokens and round trips
#
# The end-of-text token separates documents in the shards. It must be one id, never split, and no merge may
# span it. And since the alphabet is all 256 bytes, every string encodes and decodes back exactly:

# %%
print(ours.encode("a<|endoftext|>b"), "-> the special token is id", ours.special_tokens["<|endoftext|>"])
rng = random.Random(SEED)
for _ in range(200):
    s = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF), rng.randint(0x4E00, 0x9FFF),
                                rng.randint(0x1F600, 0x1F64F)])) for _ in range(rng.randint(0, 30)))
    assert ours.decode(ours.encode(s)) == s
print("200 random Unicode strings round-trip exactly")

# %% [markdown]
# ## 4. Token shards
#
# The data dir stores each split as one flat array of token ids (`train.bin`, `val.bin`), uint16 when the
# vocabulary fits in 65,535 ids and uint32 otherwise, with the end-of-text id after each document. Training
# reads random windows from a memory map, so the corpus never has to fit in RAM.

# %%
from minilm.data import TokenData, load_tokenizer, read_meta

data_dir = nb.data_dir(FAST)
meta = read_meta(data_dir)
tok = load_tokenizer(data_dir)
train = TokenData(data_dir, "train")
print(f"{len(train):,} training tokens, dtype {meta['dtype']} ({np.dtype(meta['dtype']).itemsize} bytes each), "
      f"vocab {meta['vocab_size']}")
eot = meta["eot_id"]
ends = np.flatnonzero(np.asarray(train.tokens[:200_000]) == eot)
print(f"first documents end at token {ends[:5].tolist()}; a window read back as text:")
print(tok.decode(np.asarray(train.tokens[:60]).tolist()))
x, y = train.get_batch(2, 16)
print("a batch: x", x.shape, "y = x shifted by one:", torch.equal(x[:, 1:], y[:, :-1]))

# %% [markdown]
# **Task 1** is due today: your data dir, built with the vocabulary size of your preset (8,192 for `tiny`,
# 32,000 for `mini_lm`).
#
# Next: [03_metrics.ipynb](03_metrics.ipynb).
