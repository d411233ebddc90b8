"""Benchmark every technique alone and combined on a minilm preset; prints a markdown table and saves a plot.

    python -m efficient_training.bench                      # tiny preset on this device, ~3 min on 2 CPU cores
    python -m efficient_training.bench --preset small --steps 5 --out /tmp/bench   # default --out: out/bench/

Columns: time per optimizer step (the fastest of --steps timed steps after one warm-up: on a shared machine the
minimum is the least disturbed estimate), tokens/s, memory and the
ratios to the plain fp32 step. Memory is the peak allocated by the step on CUDA (max_memory_allocated), and on
CPU, where PyTorch keeps no allocation peak, the activation memory: bytes of the tensors autograd saves for
backward (saved_tensors_hooks), which is what checkpointing and micro-batching shrink. Each number is one run on
whatever else the machine is doing; rerun before trusting a small difference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from tqdm import tqdm

from efficient_training.amp import LossScaler, autocast_context, half_copy, master_weights_step
from efficient_training.checkpointing import apply_checkpointing, saved_tensor_bytes
from efficient_training.ddp import DDP, cleanup, free_port, setup, shard
from minilm.checkpoint import atomic_write
from minilm.config import ModelConfig, get_preset
from minilm.model import GPT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def techniques(device: torch.device) -> list[dict]:
    """The rows: name, autocast dtype, master-weights copy, checkpointing, micro-batches per step."""
    half = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    rows = [
        dict(name="fp32 baseline", amp="fp32"),
        dict(name=f"{half} autocast (torch.autocast)", amp=half),
        dict(name=f"{half} autocast + LossScaler (ours)", amp=half, scaler=True),
        dict(name=f"{half} model + fp32 master weights (ours)", amp=half, master=True),
        dict(name="checkpointing (ours)", ckpt="ours"),
        dict(name="checkpointing (torch.utils.checkpoint)", ckpt="torch"),
        dict(name="grad accumulation 4 micro-batches (ours)", accum=4),
        dict(name=f"{half} + checkpointing + accumulation 4", amp=half, ckpt="ours", accum=4),
    ]
    if device.type == "cuda" and half == "bf16":
        rows.insert(3, dict(name="fp16 autocast + LossScaler (ours)", amp="fp16", scaler=True))
    return rows


def build(cfg: ModelConfig, tech: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    c = ModelConfig(**{**cfg.__dict__, "grad_checkpoint": tech.get("ckpt") == "torch"})
    model = GPT(c).to(device)
    if tech.get("ckpt") == "ours":
        apply_checkpointing(model)
    return model


def make_step(model: nn.Module, tech: dict, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A closure running one full optimizer step of this technique on the batch (x, y)."""
    dtype = DTYPES[tech.get("amp", "fp32")]
    accum = tech.get("accum", 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = LossScaler(enabled=bool(tech.get("scaler")) or dtype == torch.float16)
    if tech.get("master"):
        half = half_copy(model, dtype)
        loss_fn = lambda m: m(x, y)[1]
        return lambda: master_weights_step(half, model, opt, scaler, loss_fn, grad_clip=1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            with autocast_context(device.type, dtype):
                _, loss = model(xm, ym)
            scaler.scale(loss / accum).backward()  # equal micro-batches: dividing by their count is exact here
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    return step


def memory_bytes(model: nn.Module, tech: dict, x, y, device: torch.device, step) -> int:
    """Peak CUDA memory of one step, or on CPU the activation bytes of one micro-batch's forward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    accum = tech.get("accum", 1)
    xm, ym = x[: x.size(0) // accum], y[: y.size(0) // accum]
    m = half_copy(model, DTYPES[tech["amp"]]) if tech.get("master") else model
    m.train()
    with autocast_context(device.type, DTYPES[tech.get("amp", "fp32")]):
        return saved_tensor_bytes(lambda: m(xm, ym), exclude=m)


def time_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocator, autocast caches, lazy optimizer state
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_techniques(cfg: ModelConfig, batch: int, steps: int, device: torch.device) -> list[dict]:
    """Time and measure every technique. On CPU the timed steps are interleaved (one step of each row in turn),
    so a busy machine slows every row alike; on CUDA each row runs alone so its peak memory is its own."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen).to(device)
    interleave = device.type == "cpu"
    rows, pending = [], []
    for tech in techniques(device):
        model = build(cfg, tech, device)
        step = make_step(model, tech, x, y, device)
        mem = memory_bytes(model, tech, x, y, device, step)
        if interleave:
            step()  # warm-up
            pending.append((tech, step, mem, []))
            continue
        dt = time_steps(step, steps, device)
        rows.append(dict(name=tech["name"], ms=dt * 1e3, tok_s=batch * cfg.block_size / dt, mem_mb=mem / 2**20))
        print(f"  {tech['name']:<45} {dt * 1e3:8.1f} ms/step {mem / 2**20:8.1f} MB", flush=True)
        del model, step
    for _ in range(steps if interleave else 0):
        for _, step, _, times in pending:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    for tech, _, mem, times in pending:
        dt = min(times)
        rows.append(dict(name=tech["name"], ms=dt * 1e3, tok_s=batch * cfg.block_size / dt, mem_mb=mem / 2**20))
        print(f"  {tech['name']:<45} {dt * 1e3:8.1f} ms/step {mem / 2**20:8.1f} MB", flush=True)
    return rows


# --- DDP: 1 vs 2 processes on the same global batch ----------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, batch: int, steps: int, impl: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _, _, _, device = setup()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # processes share the cores
    cfg = ModelConfig(**cfg_dict)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model = DDP(model) if impl == "ours" else nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = shard(torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen), rank, world).to(device)
    y = shard(torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen), rank, world).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()

    dist.barrier()
    dt = time_steps(step, steps, device)
    dt_t = torch.tensor([dt], device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(dt_t, op=dist.ReduceOp.MAX)  # the step is as slow as the slowest process
    if rank == 0:
        Path(out).write_text(json.dumps({"s": dt_t.item()}))
    cleanup()


def bench_ddp(cfg: ModelConfig, batch: int, steps: int, device: torch.device) -> list[dict]:
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    runs = [(1, "ours"), (2, "ours"), (2, "torch")]
    if device.type == "cuda" and n_gpus < 2:
        print("  only one GPU: DDP with 2 processes skipped")
        runs = [(1, "ours")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, impl in runs:
            if batch % world:
                continue
            out = str(Path(tmp) / f"{world}_{impl}.json")
            mp.spawn(_ddp_worker, args=(world, free_port(), cfg.__dict__, batch, steps, impl, out), nprocs=world)
            dt = json.loads(Path(out).read_text())["s"]
            name = f"DDP {world} process{'es' if world > 1 else ''} ({'ours' if impl == 'ours' else 'torch DDP'})"
            rows.append(dict(name=name, ms=dt * 1e3, tok_s=batch * cfg.block_size / dt, mem_mb=float("nan")))
            print(f"  {name:<45} {dt * 1e3:8.1f} ms/step", flush=True)
    return rows


# --- memory: the largest batch that fits, and activation memory against depth and length ---------------------


def activation_bytes(cfg: ModelConfig, batch: int, ckpt: bool, device: torch.device) -> int:
    model = build(cfg, {"ckpt": "ours" if ckpt else None}, device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    return saved_tensor_bytes(lambda: model(x, x), exclude=model)


def largest_batch(cfg: ModelConfig, budget_mb: float, ckpt: bool, device: torch.device) -> int:
    """Largest batch whose memory fits budget_mb: measured at batch 1 and 2, extrapolated (memory is linear in
    batch), then checked by measuring at the answer and stepping down until it fits. On CUDA the memory is the
    peak of forward + backward above the model's weights (optimizer state not included)."""
    budget = budget_mb * 2**20
    m1, m2 = activation_bytes(cfg, 1, ckpt, device), activation_bytes(cfg, 2, ckpt, device)
    per_row = max(m2 - m1, 1)
    b = max(int((budget - (m1 - per_row)) // per_row), 0)
    while b > 0 and _bytes_or_inf(cfg, b, ckpt, device) > budget:
        b = int(b * 0.95)
    return b


def _bytes_or_inf(cfg: ModelConfig, batch: int, ckpt: bool, device: torch.device) -> float:
    try:
        return activation_bytes(cfg, batch, ckpt, device)
    except torch.OutOfMemoryError:  # the extrapolation overshot the real device
        torch.cuda.empty_cache()
        return float("inf")


def memory_sweep(cfg: ModelConfig, batch: int, device: torch.device) -> dict:
    """Activation MB with and without checkpointing, against n_layer (at block_size) and against block_size."""
    depths = [1, 2, 4, 8]
    seqs = [32, 64, 128, 256]
    out = {"depth": [], "seq": []}
    points = [("depth", d, {"n_layer": d}) for d in depths] + [("seq", t, {"block_size": t}) for t in seqs]
    for key, value, change in tqdm(points, desc="memory vs depth and length", leave=False):
        c = ModelConfig(**{**cfg.__dict__, **change})
        out[key].append((value, activation_bytes(c, batch, False, device) / 2**20,
                         activation_bytes(c, batch, True, device) / 2**20))
    return out


# --- output ---------------------------------------------------------------------------------------------------


def markdown(rows: list[dict], header: str, mem_label: str) -> str:
    base = rows[0]
    lines = [header, "", f"| technique | ms/step | tokens/s | speed vs fp32 | {mem_label} | memory vs fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "-" if r["mem_mb"] != r["mem_mb"] else f"{r['mem_mb']:.1f}"
        mem_ratio = "-" if r["mem_mb"] != r["mem_mb"] else f"{r['mem_mb'] / base['mem_mb']:.2f}x"
        lines.append(f"| {r['name']} | {r['ms']:.0f} | {r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x "
                     f"| {mem} | {mem_ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], sweep: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    fig = Figure(figsize=(17, 5.5))
    axes = fig.subplots(1, 3)
    names = [r["name"] for r in rows]
    base = rows[0]
    speed = [r["tok_s"] / base["tok_s"] for r in rows]
    mem = [r["mem_mb"] / base["mem_mb"] if r["mem_mb"] == r["mem_mb"] else 0.0 for r in rows]
    ys = range(len(rows))
    axes[0].barh([y + 0.2 for y in ys], speed, height=0.4, label="tokens/s vs fp32")
    axes[0].barh([y - 0.2 for y in ys], mem, height=0.4, label="memory vs fp32")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_yticks(list(ys), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    axes[0].set_title("ratio to the fp32 baseline")
    for ax, key, xlabel in ((axes[1], "depth", "n_layer"), (axes[2], "seq", "sequence length")):
        xs = [r[0] for r in sweep[key]]
        ax.plot(xs, [r[1] for r in sweep[key]], "o-", label="no checkpointing")
        ax.plot(xs, [r[2] for r in sweep[key]], "s-", label="checkpointing (ours)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("activation memory (MB)")
        ax.set_xticks(xs)
        ax.legend(fontsize=8)
        ax.set_title(f"activation memory vs {xlabel}")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(buf.getvalue(), path)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="minilm preset: tiny | small | mini_lm")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row (after one warm-up); "
                   "the fastest is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--mem-budget-mb", type=float, default=None,
                   help="memory budget for the largest-batch search (default: 1024 MB of activations on CPU, "
                        "90%% of the GPU's memory on CUDA)")
    p.add_argument("--no-ddp", action="store_true", help="skip the 1 vs 2 process DDP rows")
    p.add_argument("--out", default="out/bench", help="output directory (default out/bench, git-ignored; the "
                   "committed efficient_training/bench_results/ is the recorded run the README shows)")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda given but CUDA is not available; use --device cpu")
    run = get_preset(args.preset)
    cfg = run.model
    batch = args.batch or run.train.batch_size
    if batch % 4:
        raise SystemExit(f"--batch {batch} must be a multiple of 4 (the accumulation rows split it in 4)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"preset {args.preset} ({GPT(cfg).num_params() / 1e6:.1f}M params), batch {batch} x {cfg.block_size} "
          f"tokens, {args.steps} timed steps per row, on {name}", flush=True)

    rows = bench_techniques(cfg, batch, args.steps, device)
    if not args.no_ddp:
        rows += bench_ddp(cfg, batch, args.steps, device)
    if args.mem_budget_mb is not None:
        budget = args.mem_budget_mb
    elif device.type == "cuda":
        budget = 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        budget = 1024.0
    print(f"  searching the largest batch within {budget:.0f} MB, with and without checkpointing", flush=True)
    fit_plain = largest_batch(cfg, budget, False, device)
    fit_ckpt = largest_batch(cfg, budget, True, device)
    sweep = memory_sweep(cfg, 4, device)

    mem_label = "peak MB" if device.type == "cuda" else "activation MB"
    header = (f"**{args.preset}** preset ({GPT(cfg).num_params() / 1e6:.1f}M params), batch {batch} x "
              f"{cfg.block_size} tokens, best of {args.steps} steps, {name}, torch {torch.__version__}")
    table = markdown(rows, header, mem_label)
    table += (f"\n\nLargest batch within {budget:.0f} MB of {'GPU memory' if device.type == 'cuda' else 'activations'}:"
              f" {fit_plain} without checkpointing, {fit_ckpt} with checkpointing"
              f" ({fit_ckpt / max(fit_plain, 1):.1f}x).\n\n"
              "Activation memory (MB, batch 4) vs depth: "
              + ", ".join(f"{d} layers {a:.1f} -> {b:.1f}" for d, a, b in sweep["depth"])
              + ".\nActivation memory (MB, batch 4) vs sequence length: "
              + ", ".join(f"T={t} {a:.1f} -> {b:.1f}" for t, a, b in sweep["seq"]) + ".\n")
    tag = f"{args.preset}_{device.type}"
    atomic_write(table, out / f"bench_{tag}.md")
    summary = {"rows": rows, "largest_batch": [fit_plain, fit_ckpt], "budget_mb": budget, "sweep": sweep,
               "device": name}
    atomic_write(json.dumps(summary, indent=1), out / f"bench_{tag}.json")
    plot(rows, sweep, out / f"bench_{tag}.png", header.replace("**", ""))
    print()
    print(table)
    print(f"wrote {out / f'bench_{tag}.md'}, .json and .png in {time.time() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
