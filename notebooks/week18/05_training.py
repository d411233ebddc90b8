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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week18/05_training.ipynb)
#
# # Week 18 · 05 — Training the mini LM
#
# The model in `minilm/model.py`, its configs, a training run with learning curves (matplotlib and TensorBoard),
# and resuming. With `FAST = True` a tiny model trains for 500 steps on a subset of the built-in corpus;
# with `FAST = False` this notebook trains the course project, the `mini_lm` preset (48.5M parameters), on a GPU.
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
from course.nb import show  # displays the current figure inline, even after a package switched matplotlib to Agg

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
# YOUR CODE: my_attention
def my_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(head_dim)) v for (B, n_head, T, head_dim) tensors."""
    raise NotImplementedError("scores = q @ k.transpose(-2, -1) / sqrt(d); -inf above the diagonal; softmax; @ v")


# %%
result = check.attention(my_attention)
my_attention = check.pick(result, my_attention)


# %% [markdown]
# ### Exercise 2 — the whole attention layer
#
# Write `my_causal_self_attention(x, attn)` for `x` of shape (B, T, n_embd), using a `minilm` layer's weights:
# `attn.c_attn` (one linear layer producing q, k, v side by side), split into `attn.n_head` heads, attention,
# heads merged back, then `attn.c_proj`. The check compares with the layer itself.

# %%
# YOUR CODE: my_causal_self_attention
def my_causal_self_attention(x, attn):
    """The attention layer on x (B, T, n_embd) with attn's weights: c_attn, split into n_head heads, c_proj."""
    raise NotImplementedError("q, k, v = attn.c_attn(x).split(C, dim=2); heads: view(B, T, H, C // H).transpose(1, 2)")


# %%
result = check.causal_self_attention(my_causal_self_attention)
my_causal_self_attention = check.pick(result, my_causal_self_attention)

# %% [markdown]
# ### Exercise 3 — LayerNorm and RMSNorm
#
# GPT-2 normalises each position's vector with LayerNorm: subtract the mean, divide by the standard deviation
# (the biased one, `sqrt(mean((x - mean)^2) + eps)`, eps inside the root), then scale and shift by learned
# `weight` and `bias`. Llama-style models use **RMSNorm**: no mean, no bias, just `x / sqrt(mean(x^2) + eps) *
# weight`, computed in float32 and returned in x's dtype (bfloat16 squares lose too much precision).

# %%
# YOUR CODE: my_layer_norm
def my_layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim; bias may be None."""
    raise NotImplementedError("mean and biased variance over dim=-1 (keepdim=True); eps inside the square root")


# %%
result = check.layer_norm(my_layer_norm)
my_layer_norm = check.pick(result, my_layer_norm)

# %%
# YOUR CODE: my_rms_norm
def my_rms_norm(x, weight, eps):
    """RMSNorm over the last dim, in float32, returned in x.dtype."""
    raise NotImplementedError("xf = x.float(); xf / sqrt(mean(xf^2, -1) + eps) * weight; .to(x.dtype)")


# %%
result = check.rms_norm(my_rms_norm)
my_rms_norm = check.pick(result, my_rms_norm)

# %% [markdown]
# ### Exercise 4 — the MLP
#
# The feed-forward half of a block, with `mlp.c_fc` and `mlp.c_proj` (linear layers). `kind` is the config's
# `mlp`: `"gelu"` is GPT-2's `c_proj(gelu(c_fc(x)))` with the exact GELU `x * Phi(x)` (`0.5 x (1 + erf(x /
# sqrt 2))`); `"relu2"` squares a ReLU; `"swiglu"` (Llama) splits `c_fc(x)` into a gate and an up half and
# returns `c_proj(silu(gate) * up)`, `silu(z) = z * sigmoid(z)`.

# %%
# YOUR CODE: my_mlp
def my_mlp(x, mlp, kind="gelu"):
    """The MLP with mlp.c_fc and mlp.c_proj; kind in gelu, relu2, swiglu."""
    raise NotImplementedError("h = mlp.c_fc(x); the nonlinearity for this kind; mlp.c_proj(h)")


# %%
result = check.mlp(my_mlp, kinds=("gelu", "relu2", "swiglu"))
my_mlp = check.pick(result, my_mlp)

# %% [markdown]
# ### Exercise 5 — a transformer block
#
# Pre-LayerNorm, as GPT-2: `x = x + attention(ln_1(x))`, then `x + mlp(ln_2(x))`. Normalising the branch
# inputs (not the sum) keeps a clean residual path from the embeddings to the output. Write `my_block(x, block)`
# with your three functions and a `minilm` block's weights (`block.ln_1.weight`, `.bias`, `.eps`, ...).

# %%
# YOUR CODE: my_block
def my_block(x, block):
    """One GPT-2 block with your layer norm, attention layer and MLP, and block's weights."""
    raise NotImplementedError("x + my_causal_self_attention(my_layer_norm(x, ...ln_1...), block.attn); same for the MLP")


# %%
result = check.block(my_block)
my_block = check.pick(result, my_block)

# %% [markdown]
# ### Exercise 6 — rotary position embeddings (RoPE)
#
# Instead of adding a learned position vector, RoPE rotates each query and key by an angle proportional to its
# position, so `q·k` depends on the distance between them. Dim `i` pairs with dim `i + head_dim/2` and turns by
# `pos * theta^(-2i/head_dim)`: `y = x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)` for the
# two halves `x1, x2` (the Llama/Hugging Face layout). Write `my_rope(x, theta)` for x (B, n_head, T, head_dim),
# positions 0..T-1.

# %%
# YOUR CODE: my_rope
def my_rope(x, theta):
    """x rotated by its positions 0..T-1 (Llama layout)."""
    raise NotImplementedError("inv_freq = 1 / theta ** (arange(0, hd, 2) / hd); angles = pos[:, None] * inv_freq; "
                              "cat(angles, angles)")


# %%
result = check.rope(my_rope)
my_rope = check.pick(result, my_rope)
hd, T = 16, 12
q, k = torch.randn(1, 1, 1, hd).expand(1, 1, T, hd), torch.randn(1, 1, 1, hd).expand(1, 1, T, hd)
scores = my_rope(q, 10000.0)[0, 0] @ my_rope(k, 10000.0)[0, 0].T  # the same q and k at every position
print("q·k depends only on the distance:", torch.allclose(scores.diagonal(2), scores.diagonal(2)[0].expand(T - 2),
                                                         atol=1e-4))

# %% [markdown]
# ### Exercise 7 — a numerically stable cross-entropy
#
# The loss: `-log softmax(logits)[target]`, averaged over the positions whose target is not `ignore_index`.
# `exp(1000.0)` is inf in float32, so subtract each row's maximum first (`log softmax(z) = z - max - log sum
# exp(z - max)`); the check feeds logits around 1e4. This runs on every training step over a (tokens, vocab)
# matrix, the largest tensor of a small model, so each extra pass over it costs: the max cancels out of the loss,
# so its gradient is zero and it can be `.detach()`ed (backward then skips it), and masking the ignored rows'
# losses keeps the whole matrix in place instead of copying the kept rows out of it.

# %%
# YOUR CODE: my_cross_entropy
def my_cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of logits (N, V) against targets (N,), skipping targets equal to ignore_index."""
    raise NotImplementedError("keep = targets != ignore_index; subtract the row max; log of the sum of exp; gather")


# %%
result = check.cross_entropy(my_cross_entropy)
my_cross_entropy = check.pick(result, my_cross_entropy)

# %% [markdown]
# ### Exercise 8 — the whole GPT
#
# Now the model. The parameters are laid out below with `minilm`'s names (so `minilm`'s weights load into it and
# the check can compare logits); `Weights` is a box of layers with no `forward` of its own. Write `forward`:
# token embeddings (plus position embeddings when `config.pos == "learned"`), the blocks, the final norm, the
# head, and your loss over targets that are not -1. The config's switches are the modern recipe: `norm`
# ("layernorm" or "rmsnorm"), `mlp`, `qk_norm` (RMSNorm on each head's q and k, `attn.q_norm`/`attn.k_norm`)
# and `pos == "rope"` (your `my_rope` on q and k, after the q/k norm). The check also runs those. One more
# switch, `grad_checkpoint`, is for the memory of a long run: when it is on and the model is training, each
# block goes through `self.checkpoint(fn, x, blk)` (your `my_checkpoint` from notebook 04, passed in as
# `checkpoint=`), which keeps only the block's input for backward; section "Your run" measures it.

# %%
# YOUR CODE: Weights NormWeights MyGPT
import torch.nn as nn


class Weights(nn.Module):
    """A named box of layers: holds parameters, your functions do the computing."""

    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class NormWeights(nn.Module):
    """RMSNorm's one parameter, named as minilm names it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class MyGPT(nn.Module):
    def __init__(self, config, checkpoint=None):
        super().__init__()
        if config.grad_checkpoint and checkpoint is None:
            raise ValueError("config.grad_checkpoint is true: pass checkpoint=my_checkpoint (notebook 04), the "
                             "function that runs each block without keeping its activations")
        self.config, self.checkpoint = config, checkpoint
        c, bias, hd = config.n_embd, config.bias, config.n_embd // config.n_head
        norm = (lambda: NormWeights(c)) if config.norm == "rmsnorm" else (lambda: nn.LayerNorm(c, bias=bias))
        hidden = config.mlp_hidden or (64 * math.ceil(8 * c / 3 / 64) if config.mlp == "swiglu" else 4 * c)
        blocks = []
        for _ in range(config.n_layer):
            attn = Weights(c_attn=nn.Linear(c, 3 * c, bias=bias), c_proj=nn.Linear(c, c, bias=bias))
            if config.qk_norm:
                attn.q_norm, attn.k_norm = NormWeights(hd), NormWeights(hd)
            attn.n_head = config.n_head
            up = nn.Linear(c, 2 * hidden if config.mlp == "swiglu" else hidden, bias=bias)
            blocks.append(Weights(ln_1=norm(), attn=attn, ln_2=norm(),
                                  mlp=Weights(c_fc=up, c_proj=nn.Linear(hidden, c, bias=bias))))
        parts = dict(wte=nn.Embedding(config.vocab_size, c), h=nn.ModuleList(blocks), ln_f=norm())
        if config.pos == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, c)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight") and config.zero_init:  # each block starts as the identity
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        """(logits (B, T, vocab), mean loss over targets != -1, or None without targets).

        With config.grad_checkpoint, while training with gradients on, a block runs as
        self.checkpoint(fn, x, blk) for a function fn(x, blk) that computes it."""
        raise NotImplementedError("embed; for blk in self.transformer.h: x + attention(norm(x)), x + mlp(norm(x)); "
                                  "final norm; lm_head; my_cross_entropy(..., ignore_index=-1)")


# %%
from minilm.model import GPT

result = check.gpt(MyGPT, modern=True)
Model = check.pick(result, MyGPT)

# %% [markdown]
# ### Exercise 9 — overfit one batch
#
# Before a long run, prove the loop can learn: train on one fixed batch until the loss is near zero. If it will
# not go down there, nothing will go right on real data. Write `my_overfit(model, x, y, steps)`: your choice of
# optimizer and learning rate, a forward, `zero_grad`, `backward`, `step` each time; return the losses.

# %%
# YOUR CODE: my_overfit
def my_overfit(model, x, y, steps):
    """Train model on the batch (x, y) for `steps` steps; return the list of losses."""
    raise NotImplementedError("opt = torch.optim.AdamW(model.parameters(), lr=1e-2); then the four lines per step")


# %%
result = check.overfit(my_overfit)
overfit = check.pick(result, my_overfit)
torch.manual_seed(SEED)
tiny_cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
xb, yb = torch.randint(0, 64, (2, 2, 16))
plt.figure(figsize=(5, 2.5))
plt.plot(overfit(Model(tiny_cfg), xb, yb, 150), label=f"{Model.__name__}")
plt.axhline(math.log(64), color="grey", ls=":", label="ln(vocab)")
plt.yscale("log"); plt.xlabel("step"); plt.ylabel("loss on the one batch"); plt.legend(); show()

# %% [markdown]
# ## 3. A training run
#
# `minilm.train.train(cfg)` is the same loop as `python -m minilm.train`: with the presets' `optimizer="muon"`,
# Muon for the hidden matrices and AdamW for embeddings, head, gains and biases (section 4b says why), on one
# warm-up + cosine schedule; gradient clipping, periodic evaluation on the validation split, a sample at each evaluation, atomic
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
# ## 4b. Your own training stack
#
# So far `minilm`'s loop and optimizers trained everything. The run you hand in for task 4 is trained by *your*
# code: your `MyGPT`, your optimizers, your batches, checkpoints and loop. Each piece below has a self-check
# against the reference (torch's optimizers, `minilm`'s batches and run-dir format); while a check runs, the
# reference is watched, so a piece that calls it passes as the package's, not yours.
#
# First, bring your week-17 pieces: paste `my_lr`, `my_clip_grad_norm` and `MyScaler` from
# [04_efficient_training](../week17/04_efficient_training.ipynb) (their checks run again here). `my_train` uses
# all three: the schedule, global-norm clipping, and the loss scaler for float16 on a T4.

# %%
# YOUR CODE: my_lr my_clip_grad_norm MyScaler
def my_lr(it, warmup_iters, lr_decay_iters, lr, min_lr):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (your function from notebook 04)."""
    raise NotImplementedError("paste your my_lr from 04_efficient_training")


def my_clip_grad_norm(parameters, max_norm):
    """Global-norm clipping in place; returns the norm before clipping (your function from notebook 04)."""
    raise NotImplementedError("paste your my_clip_grad_norm from 04_efficient_training")


class MyScaler:
    """Your dynamic loss scaler from notebook 04: scale, unscale_, step, update, get_scale."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        raise NotImplementedError("paste your MyScaler from 04_efficient_training")


# %%
stack = {"lr_schedule": check.lr_schedule(my_lr), "clip_grad_norm": check.clip_grad_norm(my_clip_grad_norm),
         "loss_scaler": check.loss_scaler(MyScaler)}

# %% [markdown]
# ### Exercise 10 — AdamW as an optimizer
#
# Week 17's `my_adamw_step` was one update of one tensor. A real optimizer is a `torch.optim.Optimizer`
# subclass: it holds **param groups** (lists of parameters, each with its own `lr`, `betas`, `weight_decay`),
# keeps each parameter's moments in `self.state[p]` (so `state_dict()` saves them and `load_state_dict()` brings
# them back on resume) and updates every parameter that has a gradient in `step()`. Decoupled weight decay
# (`p -= lr * weight_decay * p`, outside the moments) and bias correction as before. Which parameters decay is
# the groups' business (exercise 13), not the optimizer's.

# %%
# YOUR CODE: MyAdamW
class MyAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a .grad, using its group's lr, betas, eps and weight_decay."""
        raise NotImplementedError("for each group, each p with a grad: self.state[p] holds step, exp_avg, exp_avg_sq")


# %%
stack["adamw_optimizer"] = check.adamw_optimizer(MyAdamW)

# %% [markdown]
# ### Exercise 11 — Muon's Newton-Schulz iteration
#
# The presets train with **Muon** (Jordan et al., 2024), not AdamW alone. Muon is momentum SGD whose update of a
# weight matrix is *orthogonalised*: the momentum `M = U S Vᵀ` is replaced by about `U Vᵀ`, every singular value
# set near 1. The gradient of a linear layer is a sum of outer products and is dominated by a few directions;
# orthogonalising gives the rare directions as large a step as the dominant ones.
#
# An SVD every step is slow on a GPU, so Muon runs a few steps of a **Newton-Schulz** iteration: matmuls only.
# With `A = X Xᵀ`, `X ← a X + (b A + c A²) X` is the odd polynomial `a X + b X Xᵀ X + c (X Xᵀ)² X`; on
# `X = U S Vᵀ` it acts on every singular value alone, `s ← a s + b s³ + c s⁵`, leaving U and V as they are.
# Divide X by its (Frobenius) norm first, so every s ≤ 1; torch's coefficients (3.4445, -4.7750, 2.0315) are
# chosen for a steep slope at 0, so five steps lift even tiny singular values into a band around 1 (not exactly
# 1, which does not hurt training). torch runs it in bfloat16 on a copy and transposes a tall matrix first, so
# `A` is the small Gram matrix. Write `my_newton_schulz(g, coefficients, steps, eps)` as torch does; the check
# compares with `torch.optim.Muon`'s own iteration.

# %%
# YOUR CODE: my_newton_schulz
def my_newton_schulz(g, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
    """The orthogonalised g (2-D), in bfloat16: `steps` quintic Newton-Schulz steps, as torch.optim.Muon."""
    raise NotImplementedError("x = g.bfloat16(); transpose if tall; x / norm; repeat x <- a x + (b A + c A @ A) x")


# %%
stack["newton_schulz"] = check.newton_schulz(my_newton_schulz)
ns = check.pick(stack["newton_schulz"], my_newton_schulz,
                lambda g, *a: torch.optim._muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7))
g_demo = torch.randn(64, 256) @ torch.diag(torch.logspace(-3, 0, 256))  # singular values over 3 decades
sv_in = torch.linalg.svdvals(g_demo / g_demo.norm())
sv_out = torch.linalg.svdvals(ns(g_demo).float())
print(f"singular values before: {float(sv_in.min()):.2e} .. {float(sv_in.max()):.2e}; "
      f"after 5 steps: {float(sv_out.min()):.2f} .. {float(sv_out.max()):.2f}")

# %% [markdown]
# ### Exercise 12 — `MyMuon`
#
# Per matrix: a momentum buffer `buf ← lerp(buf, grad, 1 - momentum)`; with Nesterov (the default) the update
# is `lerp(grad, buf, momentum)`; orthogonalise it; decay `p` by `lr * weight_decay * p`; then
# `p -= lr * sqrt(max(1, rows / cols)) * update` (torch's `adjust_lr_fn="original"`: a tall matrix takes a
# larger step). Only 2-D parameters.
#
# **Why only the hidden matrices?** The orthogonal update assumes the weight acts as a linear map, `x → W x`,
# whose every output direction a step should move equally. An embedding is a lookup table: a step touches
# only the rows of the batch's tokens, and orthogonalising would spread it over all rows. The output head
# scores tokens like an embedding and trains better with AdamW in the Muon authors' runs; gains and biases are
# vectors, with no matrix to orthogonalise. So Muon takes the attention and MLP projections inside the blocks,
# AdamW the rest, each on its own peak learning rate (the presets: AdamW 3e-3, Muon 0.02-0.03).
#
# What it buys, from `python -m minilm.ablate` ([docs/training.md](../../docs/training.md): the `tiny` shape,
# 300 steps, 614,400 tokens of `data/builtin-8k`, fp32, an Intel Xeon with avx512_bf16, 2 threads): the GPT-2
# block's val loss goes from 5.342 with AdamW to 5.085 with Muon (-0.257) at 0.91x the tokens/s; at equal wall
# time (113 s) 4.988 against 5.212. On the modern block, Muon takes 5.069 to 4.892: the largest single gain in
# the table.

# %%
# YOUR CODE: MyMuon
class MyMuon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                 coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      coefficients=coefficients, steps=steps, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every matrix with a .grad (momentum, Nesterov, Newton-Schulz, decay, scaled step)."""
        raise NotImplementedError("self.state[p]['momentum_buffer']; update = grad.lerp(buf, momentum); "
                                  "my_newton_schulz(update, ...)")


# %%
stack["muon"] = check.muon(MyMuon)

# %% [markdown]
# ### Exercise 13 — which parameter goes where
#
# `my_optimizers(model, lr, muon_lr, weight_decay, betas, muon_momentum)` returns `[MyMuon, MyAdamW]` as
# `minilm.optim.build_optimizers` does: Muon gets the 2-D weights of the `nn.Linear` layers except `lm_head`
# (and a head tied to the embedding); AdamW gets the rest in two groups: matrices with weight decay, gains
# and biases (1-D) without. Every group carries `"peak_lr"`, which `my_train` scales by the schedule.
#
# The course text used to say "no decay on embeddings": `minilm` *does* decay its embeddings (every parameter
# with 2 or more dimensions that Muon does not take goes to the decayed AdamW group), and the check follows
# the package.

# %%
# YOUR CODE: my_optimizers
def my_optimizers(model, lr, muon_lr, weight_decay, betas=(0.9, 0.95), muon_momentum=0.95):
    """[MyMuon over the hidden matrices, MyAdamW over the rest (matrices decayed, vectors not)]."""
    raise NotImplementedError("hidden = weights of nn.Linear modules not named lm_head and not an embedding's")


# %%
stack["optimizer_groups"] = check.optimizer_groups(my_optimizers)

# %% [markdown]
# ### Exercise 14 — batches from a memmap
#
# `train.bin` can be larger than memory: `np.memmap` maps it and reads only the windows you index.
# `my_get_batch(tokens, batch_size, block_size, device, rng)`: `batch_size` random starts
# `rng.integers(0, len(tokens) - block_size, size=batch_size)`, `x = tokens[i : i + block_size]`, the targets
# `y` the same window shifted by one; int64 tensors. On CUDA, copy from pinned memory with
# `non_blocking=True`, so the next batch travels while the GPU still computes.

# %%
# YOUR CODE: my_get_batch
def my_get_batch(tokens, batch_size, block_size, device, rng):
    """(x, y), each (batch_size, block_size) int64: random windows of tokens and the next tokens."""
    raise NotImplementedError("starts = rng.integers(0, len(tokens) - block_size, size=batch_size); np.stack; int64")


# %%
stack["get_batch"] = check.get_batch(my_get_batch)

# %% [markdown]
# ### Exercise 15 — checkpoints that resume exactly
#
# A run on Colab gets disconnected; resuming must continue *the same* run. Save the model, every optimizer's
# state, the step, every random stream (Python, numpy, torch, CUDA) and the data sampler's position, in
# `minilm`'s checkpoint format (`"model"`, `"optimizer"` as a list, `"step"`, `"rng"`, `"data"`, plus any
# `**fields` such as `config`, `meta`, `extra`), readable by `torch.load(weights_only=True)` (tensors, lists and
# dicts only), written to a temp file and `os.replace`d. The check trains, saves, scrambles everything, loads,
# trains on: bit for bit the uninterrupted run.

# %%
# YOUR CODE: my_save_checkpoint my_load_checkpoint
def my_save_checkpoint(path, model, optimizers, step, data_rng, **fields):
    """Write a minilm-format checkpoint (model, optimizer list, step, rng, data, plus fields) atomically."""
    raise NotImplementedError("a dict of plain states; numpy's RNG array as a tensor; temp file + os.replace")


def my_load_checkpoint(path, model, optimizers, data_rng):
    """Restore what my_save_checkpoint wrote into model, optimizers, the RNGs and data_rng; return the dict."""
    raise NotImplementedError("torch.load(path, weights_only=True); load_state_dict each; set every RNG state")


# %%
stack["checkpoint_resume"] = check.checkpoint_resume(my_save_checkpoint, my_load_checkpoint)

# %% [markdown]
# ### Exercise 16 — the training loop
#
# `my_train(model, optimizers, data_dir, out_dir, ...)` puts it together. Every step: each group's `lr` from
# `my_lr` (times its `peak_lr / lr`); `grad_accum` micro-batches, each loss divided by `grad_accum` before
# `backward`; `my_clip_grad_norm`; every optimizer steps; gradients zeroed. Under `dtype="bfloat16"` the forward
# runs in `torch.autocast`; under `"float16"` (a T4 has no bf16) your `MyScaler` scales the loss and skips
# steps whose gradients overflowed. Every `log_interval` steps a row `{step, loss, lr, tokens_per_s, mfu}` in
# `out_dir/metrics.jsonl`; every `eval_interval` steps `{step, train_loss, val_loss, val_ppl}` and a checkpoint
# with `config` (`{"model": ..., "train": ...}`), `meta` (the data dir's meta.json) and
# `extra={"trainer": "learner", "model_class": ..., "optimizer_class": ...}`; at the end the val loss over the
# whole val split beside the bigram baseline (`minilm.data.baseline_losses`). The run dir then reads like a
# `python -m minilm.train` run: `minilm.evaluate`, `minilm.serve`, `course report` and `course status` take it.

# %%
# YOUR CODE: my_train
def my_train(model, optimizers, data_dir, out_dir="out/my_run", *, max_iters=500, batch_size=16, grad_accum=1,
             lr=3e-3, min_lr=3e-4, warmup_iters=30, lr_decay_iters=None, grad_clip=1.0, eval_interval=100,
             eval_iters=10, log_interval=10, seed=0, device="cpu", dtype="float32", resume=False, final_eval=True):
    """Train model with optimizers on data_dir; write ckpt.pt, metrics.jsonl, config.yaml to out_dir."""
    raise NotImplementedError("schedule, accumulate, clip, step, log, evaluate and checkpoint; resume=True loads")


# %%
stack["train_loop"] = check.train_loop(my_train, Model, my_optimizers)

# %% [markdown]
# ### Checkpointing inside your model
#
# Task 3's config can turn on `grad_checkpoint` (on a T4 it buys batch size); your `MyGPT` then runs every
# block through your `my_checkpoint`. Paste `MyCheckpoint` and `my_checkpoint` from notebook 04; their check
# runs again. The cell after it takes one backward of your model at the run's shape, with and without
# checkpointing, from the same weights: the gradients should agree, while the activations kept for backward
# shrink to about one tensor per block.

# %%
# YOUR CODE: MyCheckpoint my_checkpoint
class MyCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        raise NotImplementedError("paste your MyCheckpoint from 04_efficient_training")

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError("paste your MyCheckpoint from 04_efficient_training")


def my_checkpoint(fn, *args):
    return MyCheckpoint.apply(fn, *args)


# %%
result = check.activation_checkpoint(my_checkpoint)
ckpt_fn = check.pick(result, my_checkpoint)

# %%
from dataclasses import replace

from efficient_training.checkpointing import saved_tensor_bytes

if Model is MyGPT:
    xb, yb = (torch.randint(0, cfg.model.vocab_size, (4, cfg.model.block_size), device=DEVICE) for _ in range(2))
    grads, kept = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        m = MyGPT(replace(cfg.model, grad_checkpoint=on), checkpoint=ckpt_fn).to(DEVICE)
        box = {}
        kept[on] = saved_tensor_bytes(lambda: box.update(loss=m(xb, yb)[1]), exclude=m)
        box["loss"].backward()
        grads[on] = [p.grad for p in m.parameters()]
    diff = max(float((a - b).abs().max()) for a, b in zip(grads[False], grads[True]))
    print(f"{cfg.model.n_layer} blocks, batch 4 x {cfg.model.block_size}: activations kept for backward "
          f"{kept[False] / 2**20:.2f} MiB plain, {kept[True] / 2**20:.2f} MiB checkpointed; largest gradient "
          f"difference {diff:.1e}")
    assert diff < 1e-4, "checkpointing changed the gradients"
else:
    print("skipped: MyGPT's check has not passed yet")

# %% [markdown]
# ### Your run
#
# With every piece passing, your stack trains the notebook's model (FAST: the tiny config on the built-in
# subset; `FAST = False` on a GPU: the `mini_lm` preset) into `out/my_run`, the run task 4 counts. Its loss over
# the whole val split should end below the bigram baseline; its curve goes next to the reference run's. With
# `FAST = False` it takes task 3's choices from `configs/my_run.yaml` (batch size, accumulation, dtype,
# checkpointing) when that file exists.

# %%
from minilm.config import parse_args

my_run, task3 = ROOT / "out" / "my_run", ROOT / "configs" / "my_run.yaml"
t, model_cfg = cfg.train, cfg.model
device_dtype = "float32" if DEVICE == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
if not FAST and task3.is_file():  # task 3's choices train task 4's run
    chosen, _ = parse_args(["--config", str(task3)], cuda=DEVICE == "cuda")
    t = replace(t, batch_size=chosen.train.batch_size, grad_accum=chosen.train.grad_accum, dtype=chosen.train.dtype)
    model_cfg = replace(model_cfg, grad_checkpoint=chosen.model.grad_checkpoint)
missing = [name for name, r in stack.items() if not r] + ([] if Model is MyGPT else ["gpt (MyGPT)"]) + (
    ["activation_checkpoint (paste yours above)"] if model_cfg.grad_checkpoint and ckpt_fn is not my_checkpoint
    else [])
if missing:
    print("skipped: your run needs every piece of your stack; these checks have not passed yet: "
          + ", ".join(missing))
else:
    shutil.rmtree(my_run, ignore_errors=True)
    torch.manual_seed(t.seed)
    my_model = MyGPT(model_cfg, checkpoint=ckpt_fn).to(DEVICE)
    my_opts = my_optimizers(my_model, t.lr, t.muon_lr, t.weight_decay, (t.beta1, t.beta2), t.muon_momentum)
    run_dtype = t.dtype if t.dtype != "auto" else device_dtype
    mine = my_train(my_model, my_opts, data_dir, my_run, max_iters=t.max_iters, batch_size=t.batch_size,
                    grad_accum=t.grad_accum, lr=t.lr, min_lr=t.min_lr, warmup_iters=t.warmup_iters,
                    grad_clip=t.grad_clip, eval_interval=t.eval_interval, eval_iters=t.eval_iters,
                    log_interval=t.log_interval, seed=t.seed, device=DEVICE, dtype=run_dtype)
    print(f"your run ({my_run}): val loss over the whole val split {mine['final_val_loss']:.3f}, "
          f"bigram {mine['bigram_val_loss']:.3f}, unigram {mine['unigram_val_loss']:.3f}")
    if os.environ.get("COURSE_STRICT") == "1":  # the solved notebook in CI: the learner's stack must learn
        assert mine["final_val_loss"] < mine["bigram_val_loss"], mine
    mine_rows = [json.loads(line) for line in (my_run / "metrics.jsonl").read_text().splitlines()]
    mine_steps = [r for r in mine_rows if r.get("loss") is not None]
    plt.figure(figsize=(6, 3))
    plt.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="minilm's loop and GPT", alpha=0.7)
    plt.plot([r["step"] for r in mine_steps], [r["loss"] for r in mine_steps], label="your stack", alpha=0.7)
    plt.xlabel("step"); plt.ylabel("training loss"); plt.legend(); show()

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
# so it says so; on a GPU it is the number to watch. The public figures near 40% (llm.c's GPT-2 124M, nanochat's
# d12, both on an H100) come from larger, tuned models; a 48M-parameter model runs smaller matrix multiplies, so
# expect well below that, and measure.

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
# ## 7. A learning-rate sweep
#
# The most important knob. Train the same model at the run's learning rate times 0.1, 1 and 10 (and 0.3 and 3
# with `FAST = False`) and put the curves on one plot: too low crawls, too high is noisy or diverges, and the
# best is usually a little below the largest rate that is still stable.

# %%
from minilm.train import TrainingAborted

factors = (0.1, 1.0, 10.0) if FAST else (0.1, 0.3, 1.0, 3.0, 10.0)
sweep_steps = 40 if FAST else 1000
plt.figure(figsize=(6, 3))
for f in factors:
    out = run_dir.with_name(f"{run_dir.name}-lr{f:g}")
    shutil.rmtree(out, ignore_errors=True)
    over = {"lr": cfg.train.lr * f, "min_lr": cfg.train.min_lr * f, "max_iters": sweep_steps,
            "lr_decay_iters": sweep_steps, "eval_interval": sweep_steps, "log_interval": 5, "tensorboard": False,
            "sample_tokens": 0, "progress": False}
    if cfg.train.optimizer == "muon":  # the hidden matrices' rate scales with the rest
        over["muon_lr"] = cfg.train.muon_lr * f
    c = apply_overrides(nb.run_config(FAST, data_dir, out_dir=str(out)), over)
    try:
        end = f"val {train(c)['val_loss']:.2f}"
    except TrainingAborted:  # the loss went non-finite: that is what too high looks like
        end = "diverged"
    rows_f = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pts = [r for r in rows_f if r.get("loss") is not None]
    plt.plot([r["step"] for r in pts], [r["loss"] for r in pts], label=f"lr x{f:g} = {c.train.lr:.1e} ({end})")
plt.xlabel("step"); plt.ylabel("training loss"); plt.legend(fontsize=8); show()

# %% [markdown]
# ## 8. An architecture ablation
#
# Which of the modern pieces pay for themselves at this size? `python -m minilm.ablate` trains one variant
# per switch (RoPE, RMSNorm, SwiGLU, QK-norm, untied head, ...) on the same data and steps and writes a table.
# The table shown is yours from `out/ablate/` if you ran it, else the one measured for the README (`docs/`);
# with neither, a two-variant run here (GPT-2 block vs the modern recipe) for a few steps: too short to conclude
# much, but the same comparison. The presets follow the winner at equal wall time.

# %%
from IPython.display import Image, Markdown, display

# Your own `python -m minilm.ablate` results (out/ablate/) first, else the measured ones committed in docs/.
saved = sorted((ROOT / "out").glob("ablate*/ablation.*")) or sorted((ROOT / "docs").glob("ablation.*"))
saved = [f for f in saved if f.suffix in (".md", ".png")]
if saved:
    for f in saved:
        display(Markdown(f.read_text()) if f.suffix == ".md" else Image(filename=str(f)))
else:
    print("no saved ablation (run `python -m minilm.ablate` for the real one): a short run here")
    variants = {"GPT-2 block": dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False),
                "modern (RoPE, RMSNorm, SwiGLU, QK-norm)": dict(pos="rope", norm="rmsnorm", mlp="swiglu",
                                                                  qk_norm=True)}
    abl_steps = 50 if FAST else 1000
    results = {}
    for name, switches in variants.items():
        out = run_dir.with_name(f"{run_dir.name}-abl-{switches['pos']}")
        shutil.rmtree(out, ignore_errors=True)
        c = apply_overrides(nb.run_config(FAST, data_dir, out_dir=str(out)),
                            {**switches, "max_iters": abl_steps, "lr_decay_iters": abl_steps,
                             "eval_interval": abl_steps, "tensorboard": False, "sample_tokens": 0, "progress": False})
        results[name] = train(c)["val_loss"]
    for name, v in results.items():
        print(f"{name:42s} val loss {v:.4f} after {abl_steps} steps")

# %% [markdown]
# ### Exercise 17 — your own ablation
#
# Now one of your choosing, with your own stack. `my_ablation(variants, config, opt_args, data_dir, out_root,
# tokens, seconds, train_kw)` takes `variants` (a name -> the config fields it changes, e.g. `{"qk_norm":
# False}`; `{}` is the base), the base `ModelConfig`, the arguments of `my_optimizers` after the model, and the
# keyword arguments of `my_train` (batch size, lr, ...). For each variant, from the same seed: the model
# `MyGPT(dataclasses.replace(config, **changes), checkpoint=my_checkpoint)` trained by `my_train` once for
# `tokens // (batch_size x grad_accum x block_size)` steps (**equal tokens**), and once for as many steps as its
# own speed fits into `seconds` (**equal time**: round(seconds x tokens/s / tokens per step), its tokens/s the
# median of the first run's `metrics.jsonl` rows after the first). Each run goes in its own dir under
# `out_root`, with `max_iters = lr_decay_iters = eval_interval` = its steps. Return one row per variant, in
# order: `{variant, changes, params, tokens_per_s, equal_tokens: {steps, val_loss, run}, equal_time: {steps,
# val_loss, run}}`, `val_loss` being `my_train`'s `final_val_loss`. The check loads every run dir your rows name
# and recomputes each number from it.

# %%
# YOUR CODE: my_ablation
def my_ablation(variants, config, opt_args, data_dir, out_root, tokens, seconds, train_kw):
    """One row per variant: trained by your stack at equal tokens and at equal time, read from its run dirs."""
    raise NotImplementedError("per variant: replace the config, train `tokens` worth of steps, read its median "
                              "tokens/s, train round(seconds * tok/s / tokens per step) steps, make the row")


# %%
stack["ablation"] = check.ablation(my_ablation)

# %% [markdown]
# Choose your variants below (two to four; what would you like to know about this model?), then read the table.
# At equal tokens a bigger or slower variant can win by doing more work per token; at equal time it has to pay
# for its speed. The rows also go to `out/my_run/ablation.json`, where `python -m course report` puts them in
# your training report.

# %%
my_variants = {"base": {}, "no QK-norm": {"qk_norm": False}, "GELU MLP": {"mlp": "gelu"}}  # yours to choose
abl_tokens, abl_seconds = (100 * 16 * 64, 3.0) if FAST else (10_000_000, 300.0)
if stack["ablation"]:
    t = cfg.train
    abl_rows = my_ablation(my_variants, cfg.model, (t.lr, t.muon_lr, t.weight_decay, (t.beta1, t.beta2),
                                                    t.muon_momentum), data_dir, ROOT / "out" / "my_ablation",
                           abl_tokens, abl_seconds,
                           dict(batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr, min_lr=t.min_lr,
                                warmup_iters=min(t.warmup_iters, 10), grad_clip=t.grad_clip, eval_iters=t.eval_iters,
                                log_interval=10, seed=t.seed, device=DEVICE, dtype=device_dtype))
    for home in (ROOT / "out" / "my_ablation", my_run):  # my_run: where `course report` finds it
        if home.is_dir():
            (home / "ablation.json").write_text(json.dumps(abl_rows, indent=1))
    print(f"{'variant':14s} {'params':>9s} {'tokens/s':>9s} {'equal tokens':>13s} {'equal time':>17s}")
    for r in abl_rows:
        print(f"{r['variant']:14s} {r['params']:9,d} {r['tokens_per_s']:9,.0f} {r['equal_tokens']['val_loss']:13.4f} "
              f"{r['equal_time']['val_loss']:10.4f} ({r['equal_time']['steps']} st)")
    x = np.arange(len(abl_rows))
    plt.figure(figsize=(6, 3))
    plt.bar(x - 0.2, [r["equal_tokens"]["val_loss"] for r in abl_rows], 0.4, label=f"{abl_tokens:,} tokens")
    plt.bar(x + 0.2, [r["equal_time"]["val_loss"] for r in abl_rows], 0.4, label=f"{abl_seconds:g} s")
    lows = [min(r["equal_tokens"]["val_loss"], r["equal_time"]["val_loss"]) for r in abl_rows]
    plt.ylim(min(lows) - 0.2, None)
    plt.xticks(x, [r["variant"] for r in abl_rows]); plt.ylabel("val loss (whole split)"); plt.legend(); show()
else:
    print("skipped: your ablation needs check.ablation to pass")

# %% [markdown]
# ## 9. Tokens per parameter
#
# Hoffmann et al. (2022, "Chinchilla") found that for a fixed compute budget, loss is lowest when a model sees
# about **20 training tokens per parameter**. A model trained on far fewer tokens than that is under-trained
# (a smaller model would have done better on the same compute); far more is fine if inference cost matters
# (Llama trains small models on 100+ tokens per parameter). Our presets:

# %%
print(f"{'preset':8s} {'params':>12s} {'tokens trained':>15s} {'tokens/param':>13s} {'Chinchilla tokens':>18s}")
for name, pc in PRESETS.items():
    with torch.device("meta"):
        n = GPT(pc.model).num_params()
    tokens = pc.train.max_iters * pc.train.batch_size * pc.train.grad_accum * pc.model.block_size
    print(f"{name:8s} {n:12,d} {tokens:15,d} {tokens / n:13.1f} {20 * n:18,d}")
ours_tokens = cfg.train.max_iters * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
print(f"this notebook's run: {GPT(cfg.model).num_params():,} parameters, {ours_tokens:,} tokens")

# %% [markdown]
# Read the table against the data: the built-in corpus holds a few million tokens, so the `mini_lm` preset's
# budget of 20 tokens per parameter (about a billion tokens) needs the `wiki_code` recipe's 100M tokens seen
# for several epochs, or more data. Repeating data up to about four epochs costs little (Muennighoff et al.,
# 2023); beyond that, returns fall. Which of the presets is closest to compute-optimal, and what would you
# change first: steps, batch size, or the model?
#
# **Task 4** ([course/README.md](../../course/README.md)): the run your own stack trained, `out/my_run` (section
# 4b; with `FAST = False` on a GPU, the `mini_lm` preset: 2-4 h on a T4, expected). Then
# `python -m minilm.evaluate --out_dir out/my_run` and `python -m course status --out_dir out/my_run`. A
# `python -m minilm.train --preset mini_lm` run is the package's: it stays the GPU project's reference to
# compare with, and status does not count it for task 4.
#
# Next: [06_evaluation.ipynb](06_evaluation.ipynb).
