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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week17/03_metrics.ipynb)
#
# # Week 17 · 03 — Measuring a language model
#
# Perplexity, BLEU, ROUGE and generation metrics, written from scratch in `metrics/` and checked against the
# tools the field trusts (`sacrebleu`, `rouge-score`). You will rebuild each one and let `course.check` compare
# your version with the reference on fresh random inputs.
#
# Days 4 and 5 of the course ([week17.md](../../course/week17.md)).

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
# ## 1. A model to measure
#
# We need a trained model and held-out tokens. `course.nb` builds (or reuses) a small data dir from the
# built-in corpus and trains a tiny GPT for a few hundred steps (or reuses the run notebook 05 made); with
# `FAST = False` it uses the full corpus and the `mini_lm` run from notebook 05.

# %%
from course import check, nb
from minilm.data import read_meta
from minilm.evaluate import scored_bytes
from minilm.sample import load_run

data_dir = nb.data_dir(FAST)
run_dir = nb.trained_run(FAST)
model, tok, ckpt = load_run(run_dir, DEVICE)
meta = read_meta(data_dir)
V, T = model.config.vocab_size, model.config.block_size
n_eval = 6_000 if FAST else 200_000
val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"])[:n_eval].astype(np.int64)
train_ids = np.fromfile(data_dir / "train.bin", dtype=meta["dtype"]).astype(np.int64)
# the bytes of the scored targets val[1:], each end-of-text counted as one byte (the document separator)
val_bytes = scored_bytes(tok, val, meta["eot_id"])
print(f"model: {model.num_params():,} parameters, vocab {V}, context {T}")
print(f"scoring {len(val):,} validation tokens = {val_bytes:,} bytes of text")

# %% [markdown]
# ## 2. Perplexity
#
# A language model gives every next token a probability. The mean negative log-likelihood of the true next
# tokens, $\text{NLL} = -\frac{1}{N}\sum_i \log p(x_i \mid x_{<i})$, is the training loss; perplexity is
# $e^{\text{NLL}}$: the number of equally likely choices the model is, on average, hesitating between. A model
# that knows nothing (uniform logits) has perplexity exactly equal to the vocabulary size.

# %%
from metrics.perplexity import perplexity

def model_fn(ids):
    with torch.no_grad():
        return model(ids.to(DEVICE))[0].float().cpu()

uniform = lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V)
print(f"uniform model: perplexity {perplexity(uniform, val, window=T).perplexity:.1f} (vocab size {V})")
r = perplexity(model_fn, val, window=T, byte_count=val_bytes)
print(f"our model, non-overlapping windows: perplexity {r.perplexity:.2f}, {r.bits_per_byte:.3f} bits/byte")

# %% [markdown]
# The model reads at most `block_size` tokens. With **non-overlapping windows** the first tokens of every window
# are predicted from almost no context. A **sliding window** moves by a `stride` smaller than the window and
# scores only the tokens no earlier window scored, so every scored token sees at least `window - stride`
# tokens of context. It costs `window / stride` times more compute. Watch perplexity fall as the stride
# shrinks:

# %%
import time

strides = [T, T // 2, T // 4] if FAST else [T, T // 2, T // 4, T // 8]
ppl, secs = [], []
for s in strides:
    t0 = time.perf_counter()
    ppl.append(perplexity(model_fn, val, window=T, stride=s, batch_size=8).perplexity)
    secs.append(time.perf_counter() - t0)
    print(f"stride {s:4d}: perplexity {ppl[-1]:8.3f}  ({secs[-1]:.2f} s)")

fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(strides, ppl, "o-"); ax[0].set_xlabel("stride"); ax[0].set_ylabel("perplexity")
ax[0].invert_xaxis(); ax[0].set_title("more context per token -> lower perplexity")
ax[1].plot(strides, secs, "o-", color="C1"); ax[1].set_xlabel("stride"); ax[1].set_ylabel("seconds")
ax[1].invert_xaxis(); ax[1].set_title("... at window/stride times the cost")
show()

# %% [markdown]
# **Baselines.** Perplexity alone says little: is 40 good? Compare with models that only count. A unigram model
# predicts each token by its frequency; a bigram model by its frequency after the previous token (add-k
# smoothed). A transformer must beat both, or it has learned nothing about context.
#
# **Bits per byte** divides the total NLL (in bits) by the bytes of text: unlike perplexity it does not depend
# on the tokenizer, so two runs with different vocabularies compare.

# %%
from metrics.baselines import bigram_perplexity, unigram_perplexity

results = {
    "uniform": perplexity(uniform, val, window=T, byte_count=val_bytes),
    "unigram": unigram_perplexity(train_ids, val, V, k=1.0, byte_count=val_bytes),
    "bigram": bigram_perplexity(train_ids, val, V, k=0.01, byte_count=val_bytes),
    "our GPT": perplexity(model_fn, val, window=T, stride=T // 2, byte_count=val_bytes),
}
for name, res in results.items():
    print(f"{name:>8}: perplexity {res.perplexity:9.2f}   bits/byte {res.bits_per_byte:.3f}")
plt.figure(figsize=(5, 3))
plt.bar(list(results), [res.bits_per_byte for res in results.values()], color=["grey", "C0", "C1", "C2"])
plt.ylabel("bits per byte (lower is better)"); show()
verdict = "beats" if results["our GPT"].nll < results["bigram"].nll else "does not yet beat"
print(f"the GPT {verdict} the bigram baseline")


# %% [markdown]
# In `FAST` mode the GPT has trained for half a minute on a small corpus: it has only started to use its
# context (note how little the stride changed above) and sits near the bigram baseline. That is what an
# undertrained model looks like; the `mini_lm` run (`FAST = False`, notebook 05) should be far below both
# baselines (expected, not measured here).

# %% [markdown]
# ### Exercise 1 — sliding-window perplexity
#
# Write `my_perplexity(model_fn, token_ids, window, stride)` returning the perplexity of the stream:
# windows start at `0, stride, 2*stride, ...`, each feeds `ids[b : b+window]` and predicts the next token
# at each position, scores only targets no earlier window scored, and the last window is the one that scores
# the final token. Sum the NLLs and count the tokens over all windows, divide once at the end.
# `help(check.perplexity)` has the full contract.
#
# The cell ships as a stub that raises `NotImplementedError`, so the check reports "not implemented yet" and the
# cells below use the package's version until yours passes: **write the body**, then run the check.

# %%
# YOUR CODE: my_perplexity
def my_perplexity(model_fn, token_ids, window, stride):
    """Perplexity of token_ids, each token but the first scored once."""
    raise NotImplementedError("a window scores only targets after the last one an earlier window scored; sum NLLs, divide once")


# %%
check.perplexity(my_perplexity)

# %% [markdown]
# ## 3. BLEU
#
# BLEU compares a system's output with reference texts by n-gram overlap: for n = 1..4, the fraction of the
# hypothesis' n-grams found in a reference (each reference n-gram can be matched at most as often as it occurs
# there: *clipping*), combined by a geometric mean and multiplied by a **brevity penalty**
# `exp(1 - ref_len / sys_len)` when the output is shorter than the references.
#
# **Corpus BLEU sums the counts over all segments and scores once**; it is not the mean of sentence BLEUs.
# `metrics.bleu` follows `sacrebleu` to the last digit, tokenizer included:

# %%
import sacrebleu

from metrics.bleu import corpus_bleu, sentence_bleu

hyps = ["def add(a, b): return a + b", "the loss is falling slowly", "import numpy as np"]
refs = [["def add(x, y): return x + y", "the training loss falls slowly", "import numpy as np"]]
ours, theirs = corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, refs)
print("ours:     ", ours)
print("sacrebleu:", theirs)
print("signature:", ours.signature)
mean_sentence = np.mean([sentence_bleu(h, [r[i] for r in refs]).score for i, h in enumerate(hyps)])
print(f"corpus BLEU {ours.score:.2f} vs mean of sentence BLEUs {mean_sentence:.2f}: not the same quantity")

# %%
ratio = np.linspace(0.3, 1.5, 200)  # sys_len / ref_len
plt.figure(figsize=(5, 3))
plt.plot(ratio, np.where(ratio >= 1, 1.0, np.exp(1 - 1 / ratio)))
plt.xlabel("hypothesis length / reference length"); plt.ylabel("brevity penalty")
plt.title("short outputs are penalised; long ones pay in precision"); show()


# %% [markdown]
# ### Exercise 2 — corpus BLEU
#
# Write `my_bleu(hypotheses, references)`: the corpus BLEU (0–100) with no smoothing, n-grams up to 4, one or
# more reference streams (`references[k][i]` is the k-th reference of segment `i`). The check's texts are
# lowercase words separated by spaces, so `str.split()` tokenizes them. Per segment, `ref_len` is the
# reference length closest to the hypothesis length (ties: the shorter).

# %%
# YOUR CODE: my_bleu
def my_bleu(hypotheses, references):
    """Corpus BLEU (0-100) of hypotheses against lists of reference streams."""
    raise NotImplementedError("sum clipped n-gram matches and totals over the corpus first; brevity penalty from total lengths")


# %%
check.bleu(my_bleu)

# %% [markdown]
# ## 4. ROUGE
#
# ROUGE is recall-oriented and came from summarisation. ROUGE-N counts clipped n-gram matches and reports
# precision, recall and F; ROUGE-L uses the **longest common subsequence** (words in order, gaps allowed).
# `metrics.rouge` reproduces Google's `rouge-score` exactly (tokenizer, Porter stemming, ROUGE-Lsum):

# %%
from rouge_score import rouge_scorer

from metrics.rouge import rouge_scores

pred = "the model learns to predict the next token"
ref = "a language model is trained to predict the next token"
ours = rouge_scores([pred], [ref], ["rouge1", "rouge2", "rougeL"], use_stemmer=True)[0]
theirs = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
for k in ours:
    print(f"{k:7s} ours F={ours[k].fmeasure:.6f}   rouge-score F={theirs[k].fmeasure:.6f}")

# %% [markdown]
# ### Exercise 3 — ROUGE-1, ROUGE-2, ROUGE-L
#
# Write `my_rouge(prediction, reference)` returning `{"rouge1": F, "rouge2": F, "rougeL": F}` (F-measures;
# lowercase words separated by spaces; no stemming). Precision divides by the prediction's n-grams, recall by
# the reference's; F = 2PR / (P + R), or 0 when both are 0.

# %%
# YOUR CODE: my_rouge
def my_rouge(prediction, reference):
    """{'rouge1': F, 'rouge2': F, 'rougeL': F} for two strings."""
    raise NotImplementedError("clipped unigram and bigram matches; rouge-L from the longest common subsequence (a DP table)")


# %%
check.rouge(my_rouge)

# %% [markdown]
# ## 5. Generation metrics
#
# Overlap with a reference is not the whole story for open-ended text. Samples should be **diverse**
# (distinct-n: the share of unique n-grams; self-BLEU: how similar the samples are to each other) and should
# not **loop** (repetition rate: the share of n-grams repeating an earlier one in the same text). Temperature
# trades one against the other; greedy decoding loops most:

# %%
from metrics.generation import distinct_n, repetition_rate, self_bleu

prompt = torch.tensor([tok.encode("def ").ids], device=DEVICE)
temps = [0.0, 0.5, 0.8, 1.0, 1.3]
rows = []
for t in temps:  # 6 continuations per temperature, generated as one batch
    batch = model.generate(prompt.repeat(6, 1), 40, temperature=t, top_k=None, seed=SEED)
    outs = [row[prompt.size(1):].tolist() for row in batch]
    texts = [tok.decode(o) for o in outs]
    rows.append((distinct_n(outs, 2), repetition_rate(outs, 4), self_bleu(texts)))
    print(f"T={t}: distinct-2 {rows[-1][0]:.3f}  repetition-4 {rows[-1][1]:.3f}  self-BLEU {rows[-1][2]:.1f}")
fig, ax = plt.subplots(1, 3, figsize=(10, 2.8))
for i, name in enumerate(["distinct-2 (higher: diverse)", "repetition-4 (lower: no loops)", "self-BLEU"]):
    ax[i].plot(temps, [r[i] for r in rows], "o-"); ax[i].set_xlabel("temperature"); ax[i].set_title(name)
show()
print("a sample at T=0.8:", repr(tok.decode(model.generate(prompt, 40, 0.8, seed=SEED)[0].tolist())))

# %% [markdown]
# ## What you should take away
#
# - Perplexity depends on the context each token gets (the stride) and on the tokenizer; report both, or
#   use bits per byte.
# - A model is only as good as its margin over counting baselines.
# - Corpus BLEU is not a mean of sentence scores; the tokenizer and smoothing are part of the number
#   (that is what sacrebleu's signature records).
# - For generated text, measure diversity and repetition as well as overlap.
#
# Next: [04_efficient_training.ipynb](04_efficient_training.ipynb).
