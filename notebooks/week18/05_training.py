# ---
# jupyter:
#   jupytext:
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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week18/05_training.ipynb)
#
# # Week 18 · 05 — Training the mini LM
#
# The model in `minilm/model.py`, its configs, a training run with learning curves (matplotlib and TensorBoard),
# and resuming. With `FAST = True` a tiny model trains for 500 steps on a subset of the built-in corpus;
# with `FAST = False` this notebook trains the course project, the `mini_lm` preset (48M parameters), on a GPU.
# Days 8–11 of the course ([week18.md](../../course/week18.md)).

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


def show():
    """Display the current figure inline, even after a package switched matplotlib to Agg to save files."""
    from IPython.display import display

    fig = plt.gcf()
    fig.tight_layout()
    display(fig)
    plt.close(fig)


print(f"FAST={FAST}, device={DEVICE}, torch {torch.__version__}")

# %% [markdown]
# ## 1. The presets
#
# Three configurations share one code path. Parameter count (embeddings tied with the output layer, counted
# once) and training FLOPs per token (6N + 12·L·C·T, the PaLM appendix formula) for each:

# %%
import math

from course import check, nb
from minilm.config import PRESETS
from minilm.model import GPT

print(f"{'preset':8s} {'params':>12s} {'layers':>6s} {'width':>6s} {'context':>7s} {'GFLOP/token':>12s}")
for name, cfg in PRESETS.items():
    with torch.device("meta"):  # shapes only: no memory, no time
        m = GPT(cfg.model)
    print(f"{name:8s} {m.num_params():12,d} {cfg.model.n_layer:6d} {cfg.model.n_embd:6d} "
          f"{cfg.model.block_size:7d} {m.flops_per_token() / 1e9:12.3f}")

# %% [markdown]
# At initialisation every token should be about equally likely, so the loss should be close to ln(vocab_size).
# A much larger value means a bad initialisation (this model uses GPT-2's: normal(0, 0.02), residual
# projections scaled by 1/sqrt(2·n_layer)):

# %%
from minilm.config import ModelConfig

cfg0 = ModelConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=64)
m0 = GPT(cfg0)
x, y = torch.randint(0, cfg0.vocab_size, (2, 8, 64))
print(f"loss at init {m0(x, y)[1].item():.3f}   ln(vocab) = {math.log(cfg0.vocab_size):.3f}")

# %% [markdown]
# ## 2. Attention, by hand
#
# Each head projects the input to queries, keys and values, scores every earlier position with
# $\mathrm{softmax}(QK^\top/\sqrt{d})$ (later positions masked out: the model must not see the future), and
# mixes the values. `minilm` calls PyTorch's fused `scaled_dot_product_attention`.
#
# ### Exercise 1 — causal scaled dot-product attention
#
# Write `my_attention(q, k, v)` for tensors of shape (batch, heads, T, head_dim) without calling
# `scaled_dot_product_attention`.

# %%
import torch.nn.functional as F

# YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
def my_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# %%
assert check.attention(my_attention)


# %% [markdown]
# ### Exercise 2 — the whole attention layer
#
# Write `my_causal_self_attention(x, attn)` for `x` of shape (B, T, n_embd), using a `minilm` layer's weights:
# `attn.c_attn` (one linear layer producing q, k, v side by side), split into `attn.n_head` heads, attention,
# heads merged back, then `attn.c_proj`. The check compares with the layer itself.

# %%
# YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
def my_causal_self_attention(x, attn):
    return attn(x)


# %%
assert check.causal_self_attention(my_causal_self_attention)

# %% [markdown]
# ## 3. A training run
#
# `minilm.train.train(cfg)` is the same loop as `python -m minilm.train`: AdamW with warm-up and cosine decay,
# gradient clipping, periodic evaluation on the validation split, a sample at each evaluation, atomic
# checkpoints (`ckpt.pt`, `ckpt_best.pt`), `metrics.jsonl` and TensorBoard logs. The config (any field can be
# overridden, as on the command line):

# %%
from minilm.config import get_preset

data_dir = nb.data_dir(FAST)
cfg = nb.run_config(FAST, data_dir)
print(f"data: {data_dir}")
print(f"model: {cfg.model}")
print(f"train: max_iters={cfg.train.max_iters} batch_size={cfg.train.batch_size} lr={cfg.train.lr} "
      f"out_dir={cfg.train.out_dir}")
base = get_preset(cfg.train.preset).to_dict()
changed = {k: v for part in ("model", "train") for k, v in cfg.to_dict()[part].items() if base[part][k] != v}
print(f"the same from a shell: python -m minilm.train --preset={cfg.train.preset} "
      + " ".join(f"--{k}={v}" for k, v in changed.items()))

# %%
import shutil

from minilm.train import train

run_dir = Path(cfg.train.out_dir)
if FAST and run_dir.exists():
    shutil.rmtree(run_dir)  # a fresh run, so the resume below starts from this one
final = train(cfg)
print({k: v for k, v in final.items() if k != "sample"})

# %% [markdown]
# ## 4. Learning curves
#
# `metrics.jsonl` holds one JSON line per logged step (training loss, learning rate, tokens/s) and per
# evaluation (train and validation loss). Validation loss still falling: train longer. Flat from the start:
# learning rate or data. Rising while training loss falls: overfitting.

# %%
import json

rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if r.get("loss") is not None]
evals = [r for r in rows if r.get("val_loss") is not None]
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train (per step)", alpha=0.6)
ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
ax[0].axhline(math.log(cfg.model.vocab_size), color="grey", ls=":", label="ln(vocab): uniform guess")
ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].legend()
lr_rows = [r for r in rows if r.get("lr") is not None]
ax[1].plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows]); ax[1].set_title("learning rate")
ax[1].set_xlabel("step"); show()
print("keys logged:", sorted({k for r in rows for k in r}))

# %% [markdown]
# **TensorBoard** shows the same curves live while a run trains. In JupyterLab or Colab:
#
# ```
# %load_ext tensorboard
# %tensorboard --logdir ../../out
# ```
#
# or from a shell: `tensorboard --logdir out/` and open http://127.0.0.1:6006. (Not run here, so the notebook
# finishes on its own in CI.)
#
# ## 5. Resuming
#
# A checkpoint holds the model, the optimizer, the step, the RNG states and the data sampler's position, so a
# resumed run continues exactly where it stopped (after a Colab disconnect, say). Train 20 more steps:

# %%
from minilm.checkpoint import load_checkpoint
from minilm.config import apply_overrides

# Resume a copy, so the finished run stays as it is for notebooks 06 and 07.
resumed_dir = run_dir.with_name(run_dir.name + "-resumed")
shutil.rmtree(resumed_dir, ignore_errors=True)
shutil.copytree(run_dir, resumed_dir)
before = load_checkpoint(resumed_dir)["step"]
more = apply_overrides(nb.run_config(FAST, data_dir, out_dir=str(resumed_dir)),
                       {"resume": True, "max_iters": before + 20, "lr_decay_iters": before + 20})
resumed = train(more)
print(f"step {before} -> {load_checkpoint(resumed_dir)['step']}; val loss {resumed['val_loss']:.4f}")

# %% [markdown]
# ## 6. Throughput and MFU
#
# Model FLOPs utilisation = achieved training FLOP/s / the device's peak. On a CPU there is no published peak,
# so it says so; on a GPU it is the number to watch (40% is good for a model this size).

# %%
tok_s = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
model = GPT(cfg.model)
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
if tok_s:
    mfu, msg = model.estimate_mfu(float(np.median(tok_s)), name, "bfloat16")
    print(f"median {np.median(tok_s):,.0f} tokens/s; {msg}")
with torch.device("meta"):
    big = GPT(PRESETS["mini_lm"].model)
print("mini_lm, if an A100 trained it at 150k tokens/s:",
      big.estimate_mfu(150_000, "NVIDIA A100-SXM4-40GB", "bfloat16")[1])

# %% [markdown]
# **Task 4** ([course/README.md](../../course/README.md)): set `FAST = False` on a GPU to train `mini_lm`
# (2–4 h on a T4, expected), or run `python -m minilm.train --preset mini_lm`; then
# `python -m course status --out_dir out/mini_lm`.
#
# Next: [06_evaluation.ipynb](06_evaluation.ipynb).
