"""The recipe ablation: the GPT-2 block, each modern change alone, then all of them, trained on the same tokens.

    python -m minilm.ablate                              # every variant, 300 steps each on data/builtin-8k
    python -m minilm.ablate --steps=100 --variants=gpt2,modern+muon
    python -m minilm.ablate --list                       # the variants and what each changes

Every run has the same shape, data, batch, schedule and seed; only the named fields change. The table gives the
final validation loss (whole val split) at equal tokens, training tokens/s, and the validation loss at equal wall
time: each run's eval curve read at the training time of the fastest run. Results go to out/ablate/ (results.json,
ablation.md, ablation.png); rerunning skips variants already done unless --force.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from minilm.checkpoint import atomic_write
from minilm.config import MODERN, apply_overrides, get_preset

# The GPT-2 block, spelled out, so the baseline stays GPT-2 whatever the presets' defaults become.
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True, bias=True,
            zero_init=False, optimizer="adamw")
VARIANTS: dict[str, dict] = {
    "gpt2": {},
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
    "untied": {"tie_embeddings": False},
    "no_bias": {"bias": False},
    "zero_init": {"zero_init": True},
    "muon": {"optimizer": "muon"},
    "modern": MODERN,
    "modern+muon": {**MODERN, "optimizer": "muon"},
    "modern_relu2+muon": {**MODERN, "mlp": "relu2", "optimizer": "muon"},
}


def run_config(name: str, args: argparse.Namespace):
    cfg = get_preset("tiny")
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                 batch_size=args.batch_size, max_iters=args.steps, lr_decay_iters=args.steps,
                 warmup_iters=max(1, args.steps // 15), eval_interval=max(1, args.steps // 10),
                 eval_iters=args.eval_iters, log_interval=max(1, args.steps // 50), dtype=args.dtype,
                 data_dir=args.data_dir, out_dir=str(Path(args.out_dir) / name), sample_tokens=0,
                 tensorboard=False, progress=False, seed=args.seed, lr=args.lr)
    return apply_overrides(cfg, {**shape, **GPT2, **VARIANTS[name]})


def train_time_curve(metrics_path: Path, tokens_per_step: int) -> tuple[list[float], list[float], float]:
    """(eval times in s of training, val losses at them, total training s) from a run's metrics.jsonl.

    Time is summed from the logged tokens/s of each logging interval, so evaluation time is excluded.
    """
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    clock, last_step, at_step = 0.0, 0, {0: 0.0}
    for r in rows:
        if "tokens_per_s" in r and r["tokens_per_s"]:
            clock += (r["step"] - last_step) * tokens_per_step / r["tokens_per_s"]
            last_step = r["step"]
            at_step[r["step"]] = clock
    steps = sorted(at_step)
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    times = [float(np.interp(s, steps, [at_step[k] for k in steps])) for s, _ in evals]
    return times, [v for _, v in evals], clock


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from minilm.train import train

    cfg = run_config(name, args)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    times, vals, train_s = train_time_curve(Path(cfg.train.out_dir) / "metrics.jsonl", tokens_per_step)
    return {"name": name, "changes": VARIANTS[name], "params": result["n_params"],
            "val_loss": result.get("final_val_loss", result.get("val_loss")),
            "tokens": args.steps * tokens_per_step, "tokens_per_s": args.steps * tokens_per_step / train_s,
            "train_s": train_s, "wall_s": wall, "eval_times": times, "eval_losses": vals}


def equal_time_losses(results: list[dict]) -> tuple[float, dict[str, float]]:
    """Each run's val loss read (linearly) at the training time of the fastest run."""
    budget = min(r["train_s"] for r in results)
    return budget, {r["name"]: float(np.interp(budget, r["eval_times"], r["eval_losses"])) for r in results}


def table(results: list[dict], machine: str) -> str:
    budget, at_budget = equal_time_losses(results)
    base = next((r for r in results if r["name"] == "gpt2"), results[0])
    lines = [f"Ablation on {machine}; {results[0]['tokens']:,} training tokens per run.",
             f"'val @ {budget:.0f} s' is the val loss after {budget:.0f} s of training (the fastest run's total).", "",
             "| variant | params | val loss (equal tokens) | vs gpt2 | tokens/s | speed vs gpt2 | "
             f"val @ {budget:.0f} s | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        delta = r["val_loss"] - base["val_loss"]
        lines.append(f"| {r['name']} | {r['params']:,} | {r['val_loss']:.3f} | {delta:+.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{at_budget[r['name']]:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        style = "-" if r["name"].startswith("modern") or r["name"] == "gpt2" else ":"
        ax1.plot(r["eval_times"], r["eval_losses"], style, marker=".", label=r["name"])
    ax1.set_xlabel("training time (s)")
    ax1.set_ylabel("val loss (nats/token)")
    ax1.set_title("val loss against wall time")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    names = [r["name"] for r in results]
    base = next((r["val_loss"] for r in results if r["name"] == "gpt2"), results[0]["val_loss"])
    deltas = [r["val_loss"] - base for r in results]
    ax2.barh(names, deltas, color=["tab:green" if d < 0 else "tab:red" for d in deltas])
    ax2.axvline(0, color="black", lw=0.8)
    ax2.invert_yaxis()
    ax2.set_xlabel("final val loss minus gpt2's (equal tokens; lower is better)")
    ax2.set_title("each change alone, then together")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(buf.getvalue(), path)


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        model += ", avx512_bf16" if "avx512_bf16" in flags.split() else ", no avx512_bf16"
    except (OSError, StopIteration):
        pass
    import os

    import torch

    return f"{model}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see --list)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak LR, the same for every variant")
    p.add_argument("--eval_iters", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data_dir", default="data/builtin-8k")
    p.add_argument("--out_dir", default="out/ablate")
    p.add_argument("--force", action="store_true", help="rerun variants that already have results")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, changes in VARIANTS.items():
            print(f"{name:20s} {changes or '(the GPT-2 block, AdamW)'}")
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if saved.get("settings") != {k: v for k, v in vars(args).items() if k not in ("variants", "force", "list")}:
        saved = {}  # other settings: the old numbers are not comparable
    saved["settings"] = {k: v for k, v in vars(args).items() if k not in ("variants", "force", "list")}
    saved.setdefault("machine", machine_name())
    done = saved.setdefault("runs", {})
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="ablation", unit="run"):
        if name in done and not args.force:
            continue
        done[name] = run_variant(name, args)
        tqdm.write(f"{name}: val loss {done[name]['val_loss']:.3f}, {done[name]['tokens_per_s']:,.0f} tokens/s")
        atomic_write(json.dumps(saved, indent=1), results_path)  # each finished run survives an interruption
    results = [done[n] for n in names]
    text = table(results, saved["machine"])
    atomic_write(text, out / "ablation.md")
    plot(results, out / "ablation.png")
    print(text)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.png'}, {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
