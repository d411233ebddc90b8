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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week18/07_serving.ipynb)
#
# # Week 18 · 07 — Sampling and serving
#
# From a checkpoint to text: decoding strategies, the KV cache, the command line, and an HTTP API with
# streaming and latency figures. Day 13 of the course ([week18.md](../../course/week18.md)).

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
    os.chdir("/content/llm-training-from-scratch/notebooks/week18")
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
from minilm.sample import eos_of, generate_text, load_run

run_dir = nb.trained_run(FAST)
model, tok, ckpt = load_run(run_dir, DEVICE)
eos = eos_of(tok, ckpt)
print(f"run {run_dir.name}: step {ckpt['step']}, {model.num_params():,} parameters")

# %% [markdown]
# ## 1. Decoding strategies
#
# Greedy decoding (temperature 0) always takes the most likely token and tends to loop. Temperature rescales
# the logits (below 1: sharper; above 1: flatter); top-k keeps the k most likely tokens; top-p (nucleus) keeps
# the smallest set whose probability reaches p. Same prompt, same seed:

# %%
prompt = "def "
for kw in [dict(temperature=0.0), dict(temperature=0.8, top_k=50), dict(temperature=1.0, top_p=0.9),
           dict(temperature=1.5, top_k=None)]:
    r = generate_text(model, tok, prompt, max_new_tokens=40, seed=SEED, eos_id=eos, **kw)
    print(f"{kw}\n  {prompt + r['text']!r}\n")

# %% [markdown]
# How the filters reshape one next-token distribution:

# %%
from minilm.inference.sampling import sample_next

ids = torch.tensor([tok.encode(prompt).ids], device=DEVICE)
with torch.no_grad():
    logits = model(ids)[0][0, -1].float().cpu()
order = logits.argsort(descending=True)[:30]
fig, ax = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
for a, (title, t, k, p) in zip(ax, [("T=1", 1.0, None, None), ("T=0.7, top-k=10", 0.7, 10, None),
                                    ("T=1, top-p=0.8", 1.0, None, 0.8)]):
    draws = sample_next(logits.repeat(4000, 1), torch.zeros(4000, 1, dtype=torch.long),
                        torch.ones(4000, 1, dtype=torch.bool), t, k, p, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=logits.numel()).float() / 4000
    a.bar(range(30), freq[order].numpy()); a.set_title(title); a.set_xlabel("token rank")
ax[0].set_ylabel("share of 4,000 draws"); show()

# %% [markdown]
# ### Exercise — the filtered distribution
#
# Write `my_probs(logits, temperature, top_k, top_p)` returning the probabilities a sampler draws from, for
# `logits` of shape (B, vocab): divide by the temperature, keep the `top_k` largest logits (if given), then
# keep the smallest set of most likely tokens whose probability reaches `top_p` (if given; the token that
# crosses the threshold stays), renormalise. The check draws from your distribution and from `minilm`'s
# `sample_next` with the same random numbers: equal distributions pick the same tokens.

# %%
# YOUR CODE: my_probs
def my_probs(logits, temperature, top_k, top_p):
    """(B, vocab) probabilities after temperature, then top-k, then top-p; zero for the tokens filtered out."""
    raise NotImplementedError("divide by temperature; -inf below the k-th largest; sort, and drop a token once the ones "
                              "before it reach top_p")


# %%
my_probs = check.pick(check.sampling(my_probs), my_probs)  # your my_generate below samples from it

# %% [markdown]
# ## 2. The KV cache
#
# Without a cache every new token reruns the model over the whole context, and attention over t positions costs
# t²: a continuation of n tokens costs about n³ in attention (and n² in the other layers). With a cache, each
# step runs the model on one position and reuses the stored keys and values: t per step, n² over the
# continuation. Same greedy output, different cost (minilm's engine first; you build your own cache for your
# model after the tiled attention below):

# %%
start = torch.tensor([tok.encode(prompt).ids], device=DEVICE)
n_new = min(48, model.config.block_size - start.size(1))
outs, secs = {}, {}
for cache in (False, True):
    t0 = time.perf_counter()
    outs[cache] = model.generate(start, n_new, temperature=0.0, use_cache=cache)
    secs[cache] = time.perf_counter() - t0
print("same tokens:", torch.equal(outs[False], outs[True]))
print(f"without cache {n_new / secs[False]:.0f} tokens/s, with cache {n_new / secs[True]:.0f} tokens/s "
      f"({secs[False] / secs[True]:.1f}x; the gain grows with context length and model size)")

# %% [markdown]
# With the cache, one step of a small model on a CPU is mostly *overhead*: hundreds of tiny PyTorch ops,
# each a few microseconds to dispatch. `model.generate(..., compile=True)` (and `python -m minilm.sample
# --compile`) decodes with a `StaticKVCache` whose shapes never change, so `torch.compile` turns the whole step
# into one graph of fused kernels. The first call compiles (about 30 s on a 2-core CPU, so it is not run here);
# after it, `mini_lm`'s shape with int8 weights and activations (`--weights w8a8`) decoded 284-300 tokens/s on 2
# cores against 67-85 eager (`python -m minilm.bench --only generate`; the main README has the table). Same
# tokens either way: `tests/test_minilm_compiled_decode.py`.

# %% [markdown]
# ### Long prompts: attention in tiles
#
# Before the first new token, the whole prompt goes through the model at once (the *prefill*), and attention
# written as `softmax(q @ k^T) @ v` builds the (B, n_head, T, T) score matrix: for a 32k-token prompt and 16
# heads that is 64 GiB in float32, for one layer. FlashAttention (Dao et al., 2022) gets the same numbers
# without it. It walks over the keys and values one tile at a time and keeps, for every query row, three
# running quantities: the largest score seen so far `m`, the sum `l` of `exp(score - m)`, and the sum `o` of
# `exp(score - m) * v`. When a tile brings a larger max `m_new`, everything accumulated so far was weighted
# against the old one, so `l` and `o` are multiplied by `exp(m - m_new)` before the tile is added; at the end
# the answer is `o / l`. This is the *online softmax*: exact, not an approximation, and it never exponentiates
# a raw score (exp of a score above ~88 is inf in float32). Memory is one tile of scores instead of T².
#
# ### Exercise — attention in tiles with an online softmax
#
# Write `my_flash_attention(q, k, v, block=64)` for q, k, v of shape (B, n_head, T, head_dim): causal
# attention that processes keys and values in tiles of `block` positions with a running max, denominator
# and output per query row, and never creates the (T, T) scores. T need not be a multiple of `block`. The
# check compares it with `scaled_dot_product_attention(is_causal=True)`, gives it scores of a few hundred
# in two trials, and looks at the size of every tensor it creates in a long one.

# %%
# YOUR CODE: my_flash_attention
def my_flash_attention(q, k, v, block=64):
    """Causal attention over key/value tiles of `block` with an online softmax; (B, n_head, T, head_dim)."""
    raise NotImplementedError("per query row keep m = -inf, l = 0, o = 0; per key tile: m_new = max(m, rowmax(s)), "
                              "rescale l and o by exp(m - m_new), add exp(s - m_new) and its @ v; return o / l")


# %%
result = check.flash_attention(my_flash_attention)
my_flash_attention = check.pick(result, my_flash_attention)

# %% [markdown]
# What the tiles buy: the peak memory of attention with materialised scores against your tiled version, as the
# prompt grows. On a GPU this is `torch.cuda.max_memory_allocated` above what was allocated before the call.
# On a CPU PyTorch keeps no allocation peak, so `efficient_training.memory.peak_bytes` watches every operator
# the call runs and adds up the bytes of the tensors they create that are alive at the same moment (output
# included; inputs, and a fused kernel's private buffers, not). Both functions here are plain PyTorch
# operators, so the count compares like with like.

# %%
import math

from efficient_training.memory import peak_bytes


def naive_attention(q, k, v):
    t = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return scores.softmax(dim=-1) @ v


lengths = [256, 512, 1024, 2048] if FAST else [1024, 2048, 4096, 8192, 16384]
B, H, HD, BLOCK = 1, 4, 32, 128
mem = {"materialised scores": [], "your tiles": []}
with torch.no_grad():
    for T in lengths:
        q, k, v = (torch.randn(B, H, T, HD, device=DEVICE) for _ in range(3))
        for name, fn in (("materialised scores", naive_attention),
                         ("your tiles", lambda q, k, v: my_flash_attention(q, k, v, block=BLOCK))):
            mem[name].append(peak_bytes(lambda: fn(q, k, v), DEVICE) / 2**20)
        gap = (my_flash_attention(q, k, v, block=BLOCK) - naive_attention(q, k, v)).abs().max().item()
        print(f"T={T:5d}: materialised {mem['materialised scores'][-1]:8.1f} MiB, tiles {mem['your tiles'][-1]:6.2f} "
              f"MiB ({mem['materialised scores'][-1] / mem['your tiles'][-1]:5.1f}x less), max |difference| {gap:.1e}")
plt.figure(figsize=(5, 3.2))
for name, ys in mem.items():
    plt.loglog(lengths, ys, "o-", base=2, label=name)
plt.xlabel("sequence length T"); plt.ylabel("peak memory (MiB)")
plt.title(f"attention, B={B}, {H} heads, head_dim {HD}, block {BLOCK}"); plt.legend(); show()

# %% [markdown]
# On the log-log plot the materialised line climbs 4x per doubling of T (the scores, the mask and the softmax
# are all T²). The tiled one hardly moves: a few block x block tiles of scores per head, a constant, plus its
# output and running sums, which grow linearly with T; the gap widens with every doubling. The arithmetic is
# the same T² either way. A GPU kernel (`F.scaled_dot_product_attention` picks one) also saves time, because
# the tiles stay in fast on-chip memory instead of a T² matrix making a round trip through the slow one;
# written with Python loops, as here, the tiles cost time instead, which is why that loop lives in a kernel.

# %% [markdown]
# ### Your own KV cache, for your own model
#
# Now you build the cache that `model.generate` used above, over **your** `MyGPT` from
# [05_training](05_training.ipynb). A step of generation without a cache runs the model on all t positions so
# far; its attention alone compares every one of them with every earlier one, about t²/2 pairs, so n new
# tokens cost about n³/6 in attention. With a cache the prompt goes through the model once (the *prefill*) and
# every layer keeps its keys and values; each later step runs the model on one position, the newest token,
# whose query is compared with the t cached keys: t per step, n²/2 in all. The other layers (projections, MLP)
# drop from n² to n position-passes.
#
# First bring your model: paste your pieces and the `MyGPT` class (with `Weights` and `NormWeights`) from
# notebook 05; the model's check runs again here.

# %%
# YOUR CODE: my_attention my_layer_norm my_rms_norm my_mlp my_rope my_cross_entropy Weights NormWeights MyGPT
import torch.nn as nn


def my_attention(q, k, v):
    raise NotImplementedError("paste your my_attention from 05_training")


def my_layer_norm(x, weight, bias, eps):
    raise NotImplementedError("paste your my_layer_norm from 05_training")


def my_rms_norm(x, weight, eps):
    raise NotImplementedError("paste your my_rms_norm from 05_training")


def my_mlp(x, mlp, kind="gelu"):
    raise NotImplementedError("paste your my_mlp from 05_training")


def my_rope(x, theta):
    raise NotImplementedError("paste your my_rope from 05_training")


def my_cross_entropy(logits, targets, ignore_index=-100):
    raise NotImplementedError("paste your my_cross_entropy from 05_training")


class Weights(nn.Module):
    def __init__(self, **layers):
        raise NotImplementedError("paste Weights from 05_training")


class NormWeights(nn.Module):
    def __init__(self, dim, eps=1e-6):
        raise NotImplementedError("paste NormWeights from 05_training")


class MyGPT(nn.Module):
    def __init__(self, config, checkpoint=None):
        raise NotImplementedError("paste your MyGPT from 05_training")


# %%
result = check.gpt(MyGPT, modern=True)
Model = check.pick(result, MyGPT)

# %% [markdown]
# ### Exercise — a KV cache and `my_generate`
#
# Write the cached forward pass as functions over the model's weights (the names are minilm's, so they work on
# your `MyGPT` and on `minilm`'s GPT alike), with your own pieces doing the computing:
#
# - `my_rope_at(x, theta, start)`: your RoPE for rows that sit at positions `start, start + 1, ...` (a decode
#   step's one row is at position t, not 0).
# - `my_kv_cache(model, batch)`: per layer a pair of zero tensors (batch, n_head, block_size, head_dim) for the
#   keys and the values.
# - `my_attend_cache(q, k, v, start)`: queries at positions `start..` against the keys 0..(start + T - 1): each
#   query sees every cached position and its own, nothing later.
# - `my_forward_cached(model, idx, cache, start)`: logits (B, T, vocab) for tokens `idx` at positions
#   `start..start + T - 1`; each layer writes its new keys and values into the cache at those columns. The
#   prefill (`start == 0`) attends over the prompt with your `my_flash_attention`, so a long prompt never builds
#   its T x T scores; a later step attends with `my_attend_cache` over the cached columns.
#
# Then `my_generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator)`: prefill the (1, P)
# prompt, then one new token per step; temperature 0 takes the argmax, otherwise draw once per step with
# `torch.multinomial(my_probs(logits, temperature, top_k, top_p), 1, generator=generator)`. Return (1, P + new).
# The check loads random `minilm` weights (both recipes: GPT-2's, and the presets' RoPE/RMSNorm/QK-norm/SwiGLU)
# into your `MyGPT`, requires your tokens to equal `minilm`'s engine's, greedy and with the same seed, and
# counts the positions your layers process: each exactly once.

# %%
# YOUR CODE: my_rope_at my_kv_cache my_attend_cache my_forward_cached my_generate
def my_rope_at(x, theta, start):
    """RoPE on x (B, n_head, T, head_dim) whose rows are positions start..start+T-1."""
    raise NotImplementedError("as my_rope, with the positions arange(start, start + T)")


def my_kv_cache(model, batch=1):
    """[(keys, values) per layer], each zeros (batch, n_head, block_size, head_dim) on the model's device."""
    raise NotImplementedError("one pair of zero tensors per layer, shaped from model.config")


def my_attend_cache(q, k, v, start):
    """Queries at positions start.. (B, H, T, hd) against keys/values 0..start+T-1 (B, H, start+T, hd)."""
    raise NotImplementedError("scaled scores; -inf where a key's position is after the query's; softmax; @ v")


@torch.no_grad()
def my_forward_cached(model, idx, cache, start):
    """Logits (B, T, vocab) for idx at positions start..start+T-1, writing each layer's k and v into cache."""
    raise NotImplementedError("embed (wpe at the offset); per block: norm, c_attn, q/k norm, my_rope_at, write k, v "
                              "at start..end; my_flash_attention if start == 0 else my_attend_cache; c_proj; MLP")



@torch.no_grad()
def my_generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(1, P + max_new_tokens): the prompt, then tokens from one prefill and one cached step per new token."""
    raise NotImplementedError("cache = my_kv_cache(model); logits of the prompt's last position; then pick a token "
                              "and run my_forward_cached on it alone at position P + i")


# %%
result = check.generate(my_generate, Model)
generate_fn = check.pick(result, my_generate)

# %% [markdown]
# **What the cache buys.** Tokens per second of generate with your cache against a loop that reruns the model's
# full forward over the whole sequence for every new token (greedy, from a one-token prompt), on a randomly
# initialised model of your class with a longer context than the notebook's run, so the lengths can grow:

# %%
from minilm.config import ModelConfig


@torch.no_grad()
def no_cache_generate(model, prompt_ids, max_new_tokens):
    """Greedy, the whole sequence through model(ids) at every step: what a cache saves."""
    ids = prompt_ids
    for _ in range(max_new_tokens):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


speed_cfg = ModelConfig(vocab_size=model.config.vocab_size, block_size=512, n_layer=4, n_head=4, n_embd=128,
                        dropout=0.0, pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False,
                        bias=False)
torch.manual_seed(SEED)
speed_model = Model(speed_cfg).to(DEVICE).eval()  # random weights: the cost per token does not depend on them
speed_lengths = [32, 64, 128, 256] if FAST else [64, 128, 256, 511]
one = torch.tensor([[0]], device=DEVICE)
speed = {"your KV cache": [], "no cache (full forward per token)": []}
for n in speed_lengths:
    t0 = time.perf_counter()
    with_cache = generate_fn(speed_model, one, n, 0.0, None, None, None)
    speed["your KV cache"].append(n / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    without = no_cache_generate(speed_model, one, n)
    speed["no cache (full forward per token)"].append(n / (time.perf_counter() - t0))
    print(f"{n:4d} new tokens: cache {speed['your KV cache'][-1]:7.0f} tokens/s, no cache "
          f"{speed['no cache (full forward per token)'][-1]:7.0f} tokens/s "
          f"({speed['your KV cache'][-1] / speed['no cache (full forward per token)'][-1]:4.1f}x), same tokens: "
          f"{torch.equal(with_cache, without)}")
plt.figure(figsize=(5, 3.2))
for name, ys in speed.items():
    plt.plot(speed_lengths, ys, "o-", label=name)
plt.xscale("log", base=2); plt.xlabel("tokens generated"); plt.ylabel("tokens/s (whole continuation)")
plt.title(f"{type(speed_model).__name__}, 4 layers x 128, {DEVICE}"); plt.legend(); show()

# %% [markdown]
# Without the cache the rate falls as the continuation grows (every step redoes all earlier positions); with it
# the rate stays nearly flat at these lengths, where a step's cost is mostly the fixed work of one position
# through the layers plus Python's per-operation overhead, and only slowly feels the growing attention over
# the cache. For the first few dozen tokens the two are close on a CPU: a model this small runs a few dozen
# positions in about the time it runs one, because dispatching its hundreds of small operations dominates.
# The gap opens with length (and with model size, where the arithmetic takes over from the overhead). "Same
# tokens" says the cache changes the cost, not the result.
#
# **Your generate on a trained model.** Samples from your task-4 run (`out/my_run`, trained by your loop in
# notebook 05) when it exists, else from this notebook's run, with its weights loaded into your class:

# %%
import yaml

from course.status import resolve

my_run = resolve("out/my_run")
base = my_run if (my_run / "ckpt.pt").is_file() else run_dir
saved = yaml.safe_load((base / "config.yaml").read_text())  # minilm.train nests it under train; my_train: flat
base_model, base_tok, _ = load_run(base, DEVICE, data_dir=resolve(saved["train"]["data_dir"] if "train" in saved
                                                                  else saved["data_dir"]))
mine = Model(base_model.config).to(DEVICE).eval()
mine.load_state_dict(base_model.state_dict())
print(f"run {base.name} ({'your task-4 run' if base == my_run else 'the notebook run'}), loaded into "
      f"{type(mine).__name__}")
gen = torch.Generator(device=DEVICE).manual_seed(SEED)
for text in ["def ", "import ", "class "]:
    ids = torch.tensor([base_tok.encode(text).ids], device=DEVICE)
    n = min(48, mine.config.block_size - ids.size(1))
    out = generate_fn(mine, ids, n, 0.8, 50, None, gen)
    print(f"{text!r} -> {base_tok.decode(out[0].tolist())!r}\n")

# %% [markdown]
# Your generate beside `minilm`'s engine (its cache, batched decoder and sampler; eager, not compiled) and the
# no-cache loop, greedy, on that model:

# %%
ids = torch.tensor([base_tok.encode("def ").ids], device=DEVICE)
n = mine.config.block_size - ids.size(1)
rows = []
for name, fn in [("your my_generate (KV cache)", lambda: generate_fn(mine, ids, n, 0.0, None, None, None)),
                 ("minilm engine (model.generate)", lambda: base_model.generate(ids, n, temperature=0.0)),
                 ("no cache (full forward per token)", lambda: no_cache_generate(mine, ids, n))]:
    fn()  # a warm-up call: the first one pays for allocations
    t0 = time.perf_counter()
    out = fn()
    rows.append((name, n / (time.perf_counter() - t0), out))
print(f"{n} new tokens after a {ids.size(1)}-token prompt, {type(mine).__name__} with {base.name}'s weights")
print(f"{'':36s} {'tokens/s':>9s}  same tokens as minilm")
for name, rate, out in rows:
    print(f"{name:36s} {rate:9.0f}  {torch.equal(out, rows[1][2])}")

# %% [markdown]
# The engine does more per step than your loop (it batches rows of different lengths, refills a full cache,
# handles end-of-text), so a plain single-sequence cache comes close to it on one sequence; both pay a flat cost
# per token where the no-cache loop pays for the whole prefix again each time, which at this run's short
# context is still cheap: the plot above shows where that changes.

# %% [markdown]
# ## 3. From the command line

# %%
cmd = [sys.executable, "-m", "minilm.sample", "--out_dir", str(run_dir), "--prompt", "import ",
       "--max_new_tokens", "30", "--temperature", "0.8", "--num_samples", "2"]
print("$ python", " ".join(cmd[1:]))
print(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout)

# %% [markdown]
# ## 4. An HTTP API
#
# `python -m minilm.serve --out_dir RUN` starts a FastAPI server on 127.0.0.1 (loopback only): `POST
# /v1/generate` (JSON, or server-sent events with `"stream": true`), `GET /health`, `GET /v1/model`,
# `GET /metrics` (Prometheus format) and a playground page at `/`. We start it in a subprocess on a free port,
# call it, stream from it and put it under a little load.

# %%
import socket

import httpx

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
server = subprocess.Popen([sys.executable, "-m", "minilm.serve", "--out_dir", str(run_dir), "--port", str(port),
                           "--log_level", "warning"], cwd=ROOT)
for _ in range(300):  # wait up to 60 s for the model to load
    try:
        if httpx.get(url + "/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if server.poll() is not None:
        raise RuntimeError("the server exited; run the command above in a shell to see why")
    time.sleep(0.2)
print(httpx.get(url + "/health").json())
print({k: v for k, v in httpx.get(url + "/v1/model").json().items() if k != "config"})

# %%
body = {"prompt": "def ", "max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "seed": SEED}
r = httpx.post(url + "/v1/generate", json=body, timeout=60).json()
print(r)
same = generate_text(model, tok, "def ", max_new_tokens=32, temperature=0.8, top_k=50, seed=SEED, eos_id=eos)
print("same text as minilm.sample with the same seed:", r.get("text") == same["text"])

# %%
events = []
with httpx.stream("POST", url + "/v1/generate", json=body | {"stream": True}, timeout=60) as resp:
    for line in resp.iter_lines():
        if line.startswith("data:"):
            events.append(line)
print(f"{len(events)} server-sent events; the first and the last:")
for line in events[:4] + ["   ..."] + events[-1:]:
    print("  ", line[:160])
bad = httpx.post(url + "/v1/generate", json=body | {"temperature": -1}, timeout=10)
print("a bad request gets", bad.status_code, bad.json())

# %% [markdown]
# **Latency under load**: `python -m minilm.serve.loadtest` sends requests from concurrent clients and reports
# latency percentiles and tokens/s (the course's numbers are in the README; `FAST` keeps this one small).

# %%
n_req, conc = (16, 4) if FAST else (200, 8)
out = subprocess.run([sys.executable, "-m", "minilm.serve.loadtest", "--url", url, "--concurrency", str(conc),
                      "--requests", str(n_req), "--max_new_tokens", "16"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300)
print(out.stdout or out.stderr)
metrics = httpx.get(url + "/metrics").text
print("\n".join(line for line in metrics.splitlines() if line and not line.startswith("#"))[:1200])

# %%
server.terminate()
server.wait(timeout=30)
print("server stopped, exit code", server.returncode)

# %% [markdown]
# The same for your task-4 run: serve `out/my_run` and load-test it with the 200 requests task 5 asks for (8 new
# tokens each in `FAST`), saving the report beside the run as `loadtest.json`, where `python -m course status`
# reads it.

# %%
if (my_run / "ckpt.pt").is_file():
    server = subprocess.Popen([sys.executable, "-m", "minilm.serve", "--out_dir", str(my_run), "--port", str(port),
                               "--log_level", "warning"], cwd=ROOT)
    for _ in range(300):  # up to 60 s for the model to load
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server on {my_run} exited; run `python -m minilm.serve --out_dir {my_run}`")
        time.sleep(0.2)
    out = subprocess.run([sys.executable, "-m", "minilm.serve.loadtest", "--url", url, "--concurrency", "8",
                          "--requests", "200", "--max_new_tokens", "8" if FAST else "64", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    server.terminate()
    server.wait(timeout=30)
    if out.returncode:
        raise RuntimeError(f"the load test failed:\n{out.stderr[-2000:]}")
    (my_run / "loadtest.json").write_text(out.stdout)
    print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("{")))
else:
    print("no out/my_run yet: train it in notebook 05 (section 4b), then run this cell again")

# %% [markdown]
# **Task 5** (second half): serve your project run, open the playground at `http://127.0.0.1:8000/`, and record
# p50/p95 latency and tokens/s with the load test. Then `python -m course status` should show all five tasks
# done.
