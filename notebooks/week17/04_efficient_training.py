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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week17/04_efficient_training.ipynb)
#
# # Week 17 · 04 — Making training fit and go fast
#
# Mixed precision with loss scaling, activation checkpointing, gradient accumulation and data-parallel training:
# each built by hand in `efficient_training/`, proven equal to PyTorch's own, and measured. Days 6 and 7 of the
# course ([week17.md](../../course/week17.md)).

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
# ## 1. Why half precision needs a loss scale
#
# float16 has 5 exponent bits: nothing below ~6e-8 survives, and many gradients of a language model are that
# small. bfloat16 keeps float32's exponent range (so it needs no scaling) but only 7 stored mantissa bits (8 with
# the implicit leading 1; float16 stores 10).

# %%
for v in [1e-3, 1e-5, 1e-7, 1e-8, 1e-9]:
    t = torch.tensor(v)
    print(f"{v:8.0e}  float16 -> {t.half().item():.3e}   bfloat16 -> {t.bfloat16().item():.3e}")
print("float16 max:", torch.finfo(torch.float16).max, "  bfloat16 max:", torch.finfo(torch.bfloat16).max)

# %% [markdown]
# Multiplying the loss by a scale S multiplies every gradient by S (backward is linear), lifting the small
# ones into range; dividing by S before the optimizer step restores them. If S is so large that a gradient
# overflows to inf/NaN, the step is **skipped** and S is halved; after `growth_interval` clean steps S doubles.
# `efficient_training.amp.LossScaler` does this by hand. Here it trains a small model next to
# `torch.amp.GradScaler`, with overflows injected at steps 2, 3 and 7 and a NaN at step 9:

# %%
from course import check
from efficient_training.amp import LossScaler, compare_with_grad_scaler

r = compare_with_grad_scaler(LossScaler, init_scale=2.0**10, growth_interval=3)
print("same scale sequence:", r["same_scales"], "| same skipped steps:", r["same_skips"],
      "| max parameter difference:", r["max_param_diff"])
plt.figure(figsize=(6, 3))
plt.step(range(len(r["torch"]["scales"])), r["torch"]["scales"], where="post", label="torch GradScaler", lw=3)
plt.step(range(len(r["ours"]["scales"])), r["ours"]["scales"], where="post", label="our LossScaler", ls="--")
for i, s in enumerate(r["ours"]["skipped"]):
    if s:
        plt.axvline(i, color="red", alpha=0.2)
plt.yscale("log", base=2); plt.xlabel("step (red: skipped)"); plt.ylabel("loss scale"); plt.legend()
show()

# %% [markdown]
# ### Exercise 1 — a dynamic loss scaler
#
# Write `MyScaler(init_scale, growth_factor, backoff_factor, growth_interval)` with GradScaler's interface:
# `scale(loss)`, `unscale_(optimizer)` (divide every gradient by the scale once, and note whether any is
# inf/NaN), `step(optimizer)` (unscale if not done, skip on inf/NaN), `update()` (back off or grow) and
# `get_scale()`. The check trains with your scaler and with `torch.amp.GradScaler` under injected overflows
# and compares the scale before each step, the skipped steps and the final weights.

# %%
# YOUR CODE: MyScaler
class MyScaler:
    """Dynamic loss scaling with GradScaler's interface (scale, unscale_, step, update, get_scale, state_dict)."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        raise NotImplementedError("keep the scale, a count of clean steps, and whether this step saw an inf/NaN")


# %%
check.loss_scaler(MyScaler, trials=2)

# %% [markdown]
# ### Exercise 2 — one AdamW step
#
# The optimizer every run here uses. Write `my_adamw_step(p, grad, m, v, t, lr, beta1, beta2, eps, weight_decay)`
# returning the new `(p, m, v)` for step `t = 1, 2, ...`: moving averages `m` of the gradient and `v` of its
# square, bias-corrected by `1 - beta^t`, the update `lr * m_hat / (sqrt(v_hat) + eps)`, and **decoupled**
# weight decay: `p` shrinks by `lr * weight_decay * p` directly (adding `weight_decay * p` to the gradient is
# Adam with L2, a different optimizer). The check runs 20 steps next to `torch.optim.AdamW`.

# %%
# YOUR CODE: my_adamw_step
def my_adamw_step(p, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step: returns (new p, new m, new v)."""
    raise NotImplementedError("decay p first: p * (1 - lr * weight_decay); then m, v, bias correction, the update")


# %%
check.adamw(my_adamw_step)

# %% [markdown]
# ### Exercise 3 — warm-up and cosine decay
#
# `my_lr(it, warmup_iters, lr_decay_iters, lr, min_lr)`: linear warm-up `lr * (it + 1) / (warmup_iters + 1)`,
# then a half cosine from `lr` down to `min_lr` at `lr_decay_iters`, then `min_lr`. (minilm's `get_lr`.)

# %%
# YOUR CODE: my_lr
def my_lr(it, warmup_iters, lr_decay_iters, lr, min_lr):
    """The learning rate at step it (0-based)."""
    raise NotImplementedError("three cases: it < warmup_iters, it >= lr_decay_iters, and the cosine in between")


# %%
result = check.lr_schedule(my_lr)
lr_fn = check.pick(result, my_lr)
from minilm.config import PRESETS

tt = PRESETS["tiny"].train  # the schedule the tiny preset trains on (AdamW's peak rate)
plt.figure(figsize=(5, 2.5))
plt.plot([lr_fn(it, tt.warmup_iters, tt.lr_decay_iters or tt.max_iters, tt.lr, tt.min_lr)
          for it in range(tt.max_iters + 20)])
plt.xlabel("step"); plt.ylabel("learning rate")
plt.title(f"tiny preset: {tt.warmup_iters} warm-up steps, cosine to {tt.max_iters}"); show()

# %% [markdown]
# ### Exercise 4 — global-norm gradient clipping
#
# `my_clip_grad_norm(parameters, max_norm)`: the norm of **all** gradients together (the square root of the sum
# of every entry squared, over parameters that have a `.grad`); if it exceeds `max_norm`, multiply every gradient
# by `max_norm / (norm + 1e-6)` in place, as `torch.nn.utils.clip_grad_norm_` does (never scale up). Return the
# norm before clipping.

# %%
# YOUR CODE: my_clip_grad_norm
def my_clip_grad_norm(parameters, max_norm):
    """Clip all gradients together to global norm max_norm, in place; return the norm before clipping."""
    raise NotImplementedError("one norm over every gradient; skip parameters whose .grad is None")


# %%
check.clip_grad_norm(my_clip_grad_norm)

# %% [markdown]
# On a CPU the practical mixed precision is **bfloat16 autocast**: matmuls run in bf16, reductions and the loss
# stay in float32, and no loss scale is needed. Whether it is faster depends on the CPU (AVX-512 BF16 / AMX);
# measure rather than assume:

# %%
import time

from minilm.config import ModelConfig
from minilm.model import GPT

cfg = ModelConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=128)
x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size))

def step_time(dtype, n=3):
    torch.manual_seed(SEED)
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    times = []
    for _ in range(n + 1):  # the first step warms up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = m(x, x)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2], loss.item()

for dt in (torch.float32, torch.bfloat16):
    s, loss = step_time(dt)
    print(f"{str(dt):15s} {s * 1000:7.1f} ms/step   loss {loss:.4f}")

# %% [markdown]
# ## 2. Activation checkpointing
#
# Backward needs the activations of the forward pass; for a transformer they dominate memory and grow with
# batch × sequence × layers × width. Checkpointing keeps only each block's *input* and recomputes the
# block's activations during backward: about one extra forward pass of compute for a large cut in memory.
# `efficient_training.checkpointing` implements it as a `torch.autograd.Function` (restoring the RNG state so
# dropout makes the same choices twice). The gradients are the same; the saved activations are not:

# %%
from efficient_training.checkpointing import activation_memory, apply_checkpointing

import copy

torch.manual_seed(SEED)
plain = GPT(ModelConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.1))
ckpt = apply_checkpointing(copy.deepcopy(plain))  # the same weights, every block checkpointed
idx = torch.randint(0, 2048, (4, 128))
grads = []
for m in (plain, ckpt):
    m.train(); m.zero_grad(); torch.manual_seed(1)
    m(idx, idx)[1].backward()
    grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
print("max gradient difference, dropout on:", (grads[0] - grads[1]).abs().max().item())

depths, mem_plain, mem_ck = [2, 4, 8], [], []
for L in depths:
    c = ModelConfig(vocab_size=2048, block_size=128, n_layer=L, n_head=4, n_embd=128)
    mem_plain.append(activation_memory(GPT(c), idx, idx) / 2**20)
    mem_ck.append(activation_memory(apply_checkpointing(GPT(c)), idx, idx) / 2**20)
plt.figure(figsize=(5, 3))
plt.plot(depths, mem_plain, "o-", label="plain"); plt.plot(depths, mem_ck, "o-", label="checkpointed")
plt.xlabel("layers"); plt.ylabel("saved activations (MiB)"); plt.legend(); show()

# %% [markdown]
# ### Exercise 5 — activation checkpointing by hand
#
# Write `MyCheckpoint`, a `torch.autograd.Function`, and `my_checkpoint(fn, *args)` that returns
# `MyCheckpoint.apply(fn, *args)`. **forward** runs `fn(*args)` under `torch.no_grad()` (so no graph, and none of
# fn's activations, is kept), saving only the tensor inputs (`ctx.save_for_backward`), the other arguments as they
# are (`None`, ints, a tuple), the RNG state and the autocast state (`torch.is_autocast_enabled(d)` and
# `torch.get_autocast_dtype(d)` for `"cpu"` and `"cuda"`). **backward** makes detached copies of the inputs that
# require grad, restores the RNG state inside `torch.random.fork_rng()` (the same dropout masks, and the
# training's own random stream left where it was), reruns `fn` under `torch.enable_grad()` and the saved
# `torch.autocast` (a training step calls `backward()` outside its autocast block, so without it a bf16 block is
# recomputed in fp32 and its gradients no longer match its forward), backpropagates `grad_outputs` through that
# fresh copy, and returns `None` for `fn` and each input's gradient. The check compares your gradients with
# `torch.utils.checkpoint`'s and a plain backward's on random blocks with dropout (one of them under bf16
# autocast), and counts the bytes saved for backward with `torch.autograd.graph.saved_tensors_hooks`. Your
# `MyGPT` in notebook 05 runs its blocks through this function when the config asks for `grad_checkpoint`.

# %%
# YOUR CODE: MyCheckpoint my_checkpoint
class MyCheckpoint(torch.autograd.Function):
    """forward: fn(*args) without a graph, keeping the inputs and the RNG state; backward: recompute and backprop."""

    @staticmethod
    def forward(ctx, fn, *args):
        raise NotImplementedError("save the RNG and autocast states and the tensor inputs; run fn under "
                                  "torch.no_grad()")

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError("restore the RNG state, recompute under torch.enable_grad() and the saved "
                                  "autocast, then backward")


def my_checkpoint(fn, *args):
    """fn(*args), storing only args for backward."""
    return MyCheckpoint.apply(fn, *args)


# %%
result = check.activation_checkpoint(my_checkpoint)
ckpt_fn = check.pick(result, my_checkpoint)

# %% [markdown]
# Your checkpointing on the GPT: wrap every block so training calls `ckpt_fn(block, x, None, layer, attn_mask,
# rope)` (the block's own arguments) and measure the saved activations at growing depth, next to the plain model:

# %%
import torch.nn as nn


class WithMyCheckpoint(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, cache=None, layer=0, attn_mask=None, rope=None):
        if self.training and cache is None:
            return ckpt_fn(self.block, x, None, layer, attn_mask, rope)
        return self.block(x, cache, layer, attn_mask, rope)


mem_mine = []
for L in depths:
    torch.manual_seed(SEED)
    m = GPT(ModelConfig(vocab_size=2048, block_size=128, n_layer=L, n_head=4, n_embd=128))
    m.transformer.h = nn.ModuleList(WithMyCheckpoint(b) for b in m.transformer.h)
    mem_mine.append(activation_memory(m, idx, idx) / 2**20)
plt.figure(figsize=(5, 3))
plt.plot(depths, mem_plain, "o-", label="plain")
plt.plot(depths, mem_mine, "s--", label="checkpointed (ckpt_fn)")
plt.xlabel("layers"); plt.ylabel("saved activations (MiB)"); plt.legend(); show()
for L, a, b in zip(depths, mem_plain, mem_mine):
    print(f"{L} layers: plain {a:6.1f} MiB, checkpointed {b:6.1f} MiB ({a / b:.1f}x less)")

# %% [markdown]
# ## 3. Gradient accumulation
#
# A batch too big for memory can be processed as k micro-batches whose gradients add up in `.grad` before one
# optimizer step. The trap: the big batch's loss is the mean over **all its tokens**, so each micro-batch's
# summed loss must be divided by the total token count. The common `loss / k` is only right when every
# micro-batch has the same number of target tokens (no padding, no ignored positions):

# %%
from efficient_training.accumulation import accumulate_gradients, concat_micro_batches

torch.manual_seed(SEED)
m = GPT(ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64))
micro = []
for i in range(4):
    xb = torch.randint(0, 256, (2, 32)); yb = torch.randint(0, 256, (2, 32))
    yb[:, : 8 * i] = -1  # ignored targets: micro-batches hold different numbers of tokens
    micro.append((xb, yb))

def grad_of(fn):
    m.zero_grad(); fn(); return torch.cat([p.grad.flatten() for p in m.parameters()])

xb, yb = concat_micro_batches(micro)
big = grad_of(lambda: m(xb, yb)[1].backward())
for norm in ("tokens", "micro_batches", "none"):
    g = grad_of(lambda: accumulate_gradients(m, micro, normalize=norm))
    print(f"normalize={norm:14s} max |difference from the big batch| = {(g - big).abs().max().item():.2e}")

# %% [markdown]
# ### Exercise 6 — the accumulation loop
#
# `my_accumulate(model, optimizer, micro_batches)`: one optimizer step from equal-sized micro-batches `(x, y)`.
# Zero the gradients, run forward and backward on each micro-batch with its loss divided by the number of
# micro-batches, then step once; return the mean loss. The check compares the parameters after two calls with
# two big-batch steps.

# %%
# YOUR CODE: my_accumulate
def my_accumulate(model, optimizer, micro_batches):
    """One optimizer step over all micro-batches; returns the mean of their losses."""
    raise NotImplementedError("zero_grad once; (loss / len(micro_batches)).backward() per micro-batch; step once")


# %%
check.accumulate(my_accumulate)

# %% [markdown]
# ## 4. Data parallelism (DDP)
#
# Each process holds a full copy of the model and a shard of the batch; after backward the gradients are
# averaged across processes with an all-reduce (fired from per-parameter hooks, in buckets, overlapping the
# rest of backward), so every copy takes the same step. `efficient_training.ddp.DDP` does this by hand. The
# proof below spawns 2 CPU processes (gloo backend) and compares their parameters after a few steps with
# single-process training on the whole batch:

# %%
from efficient_training.ddp import spawn_proof

proof = spawn_proof(world_size=2, steps=2, global_batch=4)
ref, ranks = proof["reference"], proof["ranks"]
for label, key, ref_key in [("our DDP", "ours", "sgd"), ("torch DistributedDataParallel", "torch_ddp", "sgd"),
                            ("our DDP + accumulation", "accumulation", "sgd_ignore"),
                            ("bug: gradients summed, not averaged", "no_average", "sgd"),
                            ("bug: no initial broadcast", "no_broadcast", "sgd")]:
    diff = max((ranks[r][key][name] - value).abs().max().item()
               for r in range(2) for name, value in ref[ref_key].items())
    print(f"{label:36s} max |rank's parameters - one process on the whole batch| = {diff:.2e}")
print("all-reduce calls per step:", ranks[0]["allreduce_per_step"], "in", ranks[0]["n_buckets"], "buckets")

# %% [markdown]
# ### Exercise 7 — the gradient all-reduce
#
# The heart of DDP without the buckets and the overlap: `my_all_reduce_grads(model, world_size)`, called on every
# rank after `loss.backward()`, replaces each parameter's `.grad` by its mean over the ranks, using
# `torch.distributed.all_reduce` (it sums in place; gloo has no average, so divide by `world_size`). Skip parameters
# without a gradient (frozen ones). The check forks 2 CPU processes joined by gloo, runs backward on each rank's
# half of a random batch, calls your function, and compares every rank's gradients with one process's on the
# whole batch; after one SGD step the ranks' weights must be bitwise equal.

# %%
# YOUR CODE: my_all_reduce_grads
def my_all_reduce_grads(model, world_size):
    """Average every .grad of model over the processes, in place."""
    raise NotImplementedError("for each p with a .grad: all_reduce it (a sum), then divide by world_size")


# %%
result = check.ddp_all_reduce(my_all_reduce_grads)
reduce_fn = check.pick(result, my_all_reduce_grads)

# %% [markdown]
# With `reduce_fn`, 2 processes each take one SGD step on their own shard of a batch, for three small MLPs that
# start from the same weights on both ranks. Without the all-reduce each rank steps along its own shard's gradient
# and the copies part at once; with it they stay bitwise identical:

# %%
from course.check.distributed import run_ranks

cases = [dict(seed=SEED + i, d_in=6, hidden=16, d_out=2, per_rank=4, frozen=False) for i in range(3)]
for label, fn in [("with reduce_fn", reduce_fn), ("no all-reduce", lambda model, world_size: None)]:
    res = run_ranks(fn, cases)
    spread = max((res[0]["cases"][i]["weights"][n] - res[1]["cases"][i]["weights"][n]).abs().max().item()
                 for i in range(len(cases)) for n in res[0]["cases"][i]["weights"])
    print(f"{label:15s} largest difference between the two ranks' weights after a step: {spread:.2e}")

# %% [markdown]
# On a GPU cluster the same code runs under `torchrun`: `torchrun --standalone --nproc_per_node 4 -m
# minilm.train --preset mini_lm` (PyTorch's DistributedDataParallel there; ours is for understanding).
#
# ## 5. The benchmark
#
# `python -m efficient_training.bench` times every technique alone and combined on this device and writes a
# markdown table and a plot to `efficient_training/bench_results/`. On a 2-core CPU it takes a few minutes, so
# the notebook shows the saved results when they exist (run the command to refresh them):

# %%
from IPython.display import Image, Markdown, display

results = ROOT / "efficient_training" / "bench_results"
tables = sorted(results.glob("*.md")) if results.is_dir() else []
if tables:
    for t in tables:
        display(Markdown(t.read_text()))
    for png in sorted(results.glob("*.png")):
        display(Image(filename=str(png)))
else:
    print("no saved benchmark yet: run `python -m efficient_training.bench` from", ROOT)
if not FAST:  # the full benchmark, on this machine (minutes on a GPU)
    subprocess.run([sys.executable, "-m", "efficient_training.bench", "--preset", "mini_lm"], cwd=ROOT)

# %% [markdown]
# **Task 3** ([course/README.md](../../course/README.md)): choose your week-18 configuration from these numbers
# (batch size, accumulation, dtype, checkpointing) and write down the throughput you expect. GPU figures in
# the course text are expectations until you measure them. Status wants two files: your own benchmark in
# `out/bench/` (the committed `bench_results/` is the course's) and your config in `configs/my_run.yaml`. `FAST`
# runs the smallest benchmark (one timed step per row, `tiny`, no DDP rows); the cell then writes a first config
# only if you have none yet, and proves it loads the way `python -m minilm.train --config` will read it. Edit the
# file: it is yours.

# %%
import json

from minilm.config import parse_args

bench_args = ["--batch", "4", "--steps", "1", "--no-ddp", "--mem-budget-mb", "16"] if FAST else ["--preset", "mini_lm"]
subprocess.run([sys.executable, "-m", "efficient_training.bench", *bench_args, "--out", "out/bench"], cwd=ROOT,
               check=True, capture_output=True)
bench = max((ROOT / "out" / "bench").glob("bench_*.json"), key=lambda p: p.stat().st_mtime)
print(f"your benchmark: {bench.relative_to(ROOT)}, {len(json.loads(bench.read_text())['rows'])} measured rows")
my_config = ROOT / "configs" / "my_run.yaml"
if not my_config.is_file():  # a T4 has no bf16: float16 with a loss scaler; checkpointing buys batch size
    my_config.write_text("# my week-18 run: python -m minilm.train --config configs/my_run.yaml\n"
                         "preset: mini_lm\nbatch_size: 16\ngrad_accum: 4\ndtype: float16\ngrad_checkpoint: false\n")
cfg, _ = parse_args(["--config", str(my_config)], cuda=False)
print(f"{my_config.relative_to(ROOT)} loads: preset {cfg.train.preset}, batch {cfg.train.batch_size} x "
      f"{cfg.train.grad_accum}, dtype {cfg.train.dtype}, grad_checkpoint {cfg.model.grad_checkpoint}")

# %% [markdown]
#
# Next week: [05_training.ipynb](../week18/05_training.ipynb).
