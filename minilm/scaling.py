"""Scaling laws on CPU: a grid of short `tiny`-family runs, a fit of L(N, D), and a prediction checked by a run.

    python -m minilm.scaling                       # grid + fit + held-out run, writes docs/scaling.{json,md,png}
    python -m minilm.scaling --fit_only            # refit the runs already in out/scaling/

The grid is isoFLOP-shaped (Chinchilla's approach 2): for each of 3 compute budgets C, 4 model widths, each trained
for D = C / (training FLOPs per token) tokens. Every run is its own run dir out/scaling/<name>/ (result.json marks
it finished; a rerun skips it, a run cut short resumes from its ckpt.pt). The loss of a run is the trainer's own
final val loss over the whole val split.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta by minimising a Huber loss (delta 1e-3) between the
log-sum-exp form of log L and the measured log loss, from a grid of starts (Hoffmann et al. 2022, appendix D.2).
N counts non-embedding parameters (Kaplan et al. 2020): at these widths the 8k-token embedding and head are most
of the weights and would hide the trend. Intervals come from refitting bootstrap resamples of the runs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minilm.checkpoint import atomic_write

CONSTANTS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class Spec:
    """One run of the grid: a width of the tiny family trained for `steps` optimizer steps."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    steps: int
    budget: float  # the compute budget (FLOPs) this run belongs to; 0 for the held-out run


# The tiny family: depth and width grow together, head size >= 16 and even (RoPE).
SIZES = ((1, 2, 32), (2, 4, 64), (3, 4, 96), (4, 4, 128))
BUDGETS = (1.0e12, 2.5e12, 6.0e12)
HELD_OUT = ((5, 4, 160), 1.2e13)  # larger in N and in compute than every run of the fit


# ----------------------------------------------------------------------------- the law and its fit


def predict_loss(p: dict, N, D):
    """L(N, D) = E + A / N^alpha + B / D^beta for arrays or scalars."""
    N, D = np.asarray(N, float), np.asarray(D, float)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def _objective(theta: np.ndarray, lN, lD, lL, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log L(N, D) = LSE(a - alpha log N, b - beta log D, e) against log L, and its gradient."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    m = u.max(axis=0)
    w = np.exp(u - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - lL
    w /= s
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta)
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * lN).sum(), -(g * w[1] * lD).sum()])
    return float(value), grad


def _start_grid() -> np.ndarray:
    """Chinchilla's initialisation grid over (a, b, e, alpha, beta)."""
    ab = np.arange(0.0, 30.0, 5.0)
    return np.array(list(itertools.product(ab, ab, np.arange(-1.0, 1.5, 0.5), np.arange(0.0, 2.5, 0.5),
                                           np.arange(0.0, 2.5, 0.5))))


_STARTS = _start_grid()


def _grid_values(starts: np.ndarray, lN, lD, lL, delta: float) -> np.ndarray:
    """The Huber objective at every start at once (the same formula as _objective, vectorised over starts)."""
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
    u = np.stack([a - alpha * lN, b - beta * lD, np.broadcast_to(e, (len(starts), len(lN)))])
    m = u.max(axis=0)
    r = m + np.log(np.exp(u - m).sum(axis=0)) - lL
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)


def fit_law(N, D, L, *, delta: float = 1e-3, n_starts: int = 8) -> dict:
    """Fit E, A, B, alpha, beta to runs (N, D, final loss) by Chinchilla's approach 3.

    The objective is evaluated on the whole start grid and L-BFGS runs from the n_starts best points; the best
    optimum wins. Returns the constants and the objective value ("huber").
    """
    from scipy.optimize import minimize

    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if not (N.shape == D.shape == L.shape) or N.size < 5:
        raise ValueError(f"fit_law needs at least 5 runs with N, D and L of one length (got {N.size})")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("N, D and L must all be positive")
    lN, lD, lL = np.log(N), np.log(D), np.log(L)
    values = _grid_values(_STARTS, lN, lD, lL, delta)
    best = None
    for i in np.argsort(values)[:n_starts]:
        res = minimize(_objective, _STARTS[i], args=(lN, lD, lL, delta), jac=True, method="L-BFGS-B",
                       options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta),
            "huber": float(best.fun)}


def fit_loss_of_n(N, L) -> dict:
    """The same fit with the data term left out, L = E + A / N^alpha (for comparison: it cannot see D)."""
    from scipy.optimize import curve_fit

    N, L = np.asarray(N, float), np.asarray(L, float)
    (E, A, alpha), _ = curve_fit(lambda n, E, A, al: E + A / n ** al, N, L, p0=(L.min() * 0.8, 10.0, 0.3),
                                 maxfev=20000)
    return {"E": float(E), "A": float(A), "B": 0.0, "alpha": float(alpha), "beta": 0.0}


def bootstrap(N, D, L, *, n_boot: int = 200, seed: int = 0, fit=fit_law) -> list[dict]:
    """Refit on n_boot resamples of the runs (with replacement); resamples with < 5 distinct runs are redrawn."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_boot:
        idx = rng.integers(0, len(N), len(N))
        if len(set(idx.tolist())) < 5:
            continue
        out.append(fit(N[idx], D[idx], L[idx]))
    return out


def interval(values, level: float = 0.95) -> list[float]:
    lo, hi = np.quantile(np.asarray(values, float), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def constants_with_intervals(point: dict, boots: list[dict], level: float = 0.95) -> dict:
    return {k: {"value": point[k], "interval": interval([b[k] for b in boots], level)} for k in CONSTANTS}


def prediction(point: dict, boots: list[dict], N: float, D: float, level: float = 0.95) -> dict:
    """Predicted loss at (N, D) with the bootstrap interval of the prediction."""
    return {"N": float(N), "D": float(D), "loss": float(predict_loss(point, N, D)),
            "interval": interval([predict_loss(b, N, D) for b in boots], level)}


def synthetic_runs(truth: dict, N, D, *, noise: float = 0.005, seed: int = 0) -> np.ndarray:
    """Losses from known constants with multiplicative log-normal noise: for testing a fit."""
    rng = np.random.default_rng(seed)
    L = predict_loss(truth, N, D)
    return L * np.exp(noise * rng.standard_normal(np.shape(L)))


# ----------------------------------------------------------------------------- approach 2: the isoFLOP view


def isoflop(runs: list[dict]) -> dict:
    """Per budget, a parabola of log L over log N; its vertex is that budget's loss-optimal N (and D).

    When the vertex is outside the sizes tried (or the parabola opens down) the best run stands in and
    `inside` says so. With two or more budgets, N_opt and D_opt are fitted as power laws of C.
    """
    levels = []
    for budget in sorted({r["budget"] for r in runs if r["budget"] > 0}):
        group = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["N"])
        if len(group) < 3:
            continue
        lN = np.log([r["N"] for r in group])
        lL = np.log([r["loss"] for r in group])
        lD = np.log([r["D"] for r in group])
        c2, c1, c0 = np.polyfit(lN, lL, 2)
        vertex = -c1 / (2 * c2) if c2 > 0 else None
        inside = vertex is not None and lN[0] <= vertex <= lN[-1]
        x = vertex if inside else lN[int(np.argmin(lL))]
        levels.append({"budget": budget, "flops": float(np.mean([r["flops"] for r in group])),
                       "N_opt": float(math.exp(x)), "D_opt": float(math.exp(np.interp(x, lN, lD))),
                       "loss_opt": float(math.exp(np.polyval([c2, c1, c0], x))), "inside": bool(inside),
                       "parabola": [float(c2), float(c1), float(c0)]})
    out: dict = {"levels": levels}
    if len(levels) >= 2:
        lC = np.log([lv["flops"] for lv in levels])
        out["N_opt_exponent"] = float(np.polyfit(lC, np.log([lv["N_opt"] for lv in levels]), 1)[0])
        out["D_opt_exponent"] = float(np.polyfit(lC, np.log([lv["D_opt"] for lv in levels]), 1)[0])
    return out


# ----------------------------------------------------------------------------- shapes, FLOPs and budgets


@functools.lru_cache(maxsize=4096)
def shape_counts(n_layer: int, n_head: int, n_embd: int, *, vocab_size: int = 8192, block_size: int = 128,
                 preset: str = "tiny") -> tuple[int, float]:
    """(non-embedding parameters, training FLOPs per token) of a preset's model at this shape, built on `meta`."""
    import torch

    from minilm.config import get_preset
    from minilm.model import GPT

    m = get_preset(preset).model
    m.n_layer, m.n_head, m.n_embd, m.vocab_size, m.block_size = n_layer, n_head, n_embd, vocab_size, block_size
    with torch.device("meta"):
        model = GPT(m)
    embedding = {id(model.transformer.wte.weight), id(model.lm_head.weight)}
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embedding)
    return n, float(model.flops_per_token())


def compute_optimal(point: dict, flops: float, *, vocab_size: int = 8192, block_size: int = 128) -> dict:
    """The shape of the grid's family (n_layer = k, n_embd = 32k, k = 1..48) with the lowest predicted loss at
    `flops`; the law was fitted on that family, so it is not asked about other aspect ratios."""
    best = None
    for k in range(1, 49):
        N, fpt = shape_counts(k, max(1, k), 32 * k, vocab_size=vocab_size, block_size=block_size)
        D = flops / fpt
        loss = float(predict_loss(point, N, D))
        if best is None or loss < best["loss"]:
            best = {"flops": flops, "n_layer": k, "n_embd": 32 * k, "N": N, "D": D, "loss": loss,
                    "tokens_per_param": D / N}
    return best


def grid_specs(sizes=SIZES, budgets=BUDGETS, *, tokens_per_step: int = 16 * 128, **shape_kw) -> list[Spec]:
    specs = []
    for (n_layer, n_head, n_embd), budget in itertools.product(sizes, budgets):
        _, fpt = shape_counts(n_layer, n_head, n_embd, **shape_kw)
        steps = max(10, round(budget / (fpt * tokens_per_step)))
        specs.append(Spec(f"L{n_layer}_C{n_embd}_F{budget:.1e}", n_layer, n_head, n_embd, steps, budget))
    return specs


def held_out_spec(held_out=HELD_OUT, *, tokens_per_step: int = 16 * 128, **shape_kw) -> Spec:
    (n_layer, n_head, n_embd), flops = held_out
    _, fpt = shape_counts(n_layer, n_head, n_embd, **shape_kw)
    return Spec(f"heldout_L{n_layer}_C{n_embd}", n_layer, n_head, n_embd,
                max(10, round(flops / (fpt * tokens_per_step))), 0.0)


# ----------------------------------------------------------------------------- running the grid


def train_argv(spec: Spec, data_dir: str, out_dir: Path, extra: list[str]) -> list[str]:
    """The `python -m minilm.train` arguments of one run (the tiny preset at this shape and length)."""
    return ["--preset=tiny", f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--n_layer={spec.n_layer}",
            f"--n_head={spec.n_head}", f"--n_embd={spec.n_embd}", f"--max_iters={spec.steps}",
            f"--lr_decay_iters={spec.steps}", f"--warmup_iters={max(2, spec.steps // 10)}",
            f"--eval_interval={max(5, spec.steps // 3)}", "--eval_iters=5",
            f"--log_interval={max(1, spec.steps // 20)}",
            "--sample_tokens=0", "--tensorboard=false", "--progress=false", "--dtype=float32", "--final_eval=true",
            *extra]


def _median_tokens_per_s(metrics_path: Path) -> float | None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")][1:]  # the first includes start-up
    return float(np.median(rates)) if rates else None


def run_point(spec: Spec, data_dir: str, out_root: Path, extra: list[str] = ()) -> dict:
    """Train one grid point unless its result.json exists; resume from ckpt.pt when a run was cut short."""
    from minilm.config import parse_args
    from minilm.train import train

    out_dir = out_root / spec.name
    done = out_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result["spec"] != asdict(spec) or result["extra"] != list(extra):
            raise SystemExit(f"{out_dir} holds a different run ({result['spec']}, {result['extra']}); "
                             f"delete it or pick another --out_dir")
        return {**result, "skipped": True}
    argv = train_argv(spec, data_dir, out_dir, list(extra))
    resumed = (out_dir / "ckpt.pt").is_file()
    cfg, _ = parse_args(argv + (["--resume"] if resumed else []), cuda=False)
    t0 = time.perf_counter()
    out = train(cfg, f"scaling grid: {spec.name}")
    wall = time.perf_counter() - t0
    if "final_val_loss" not in out:
        raise SystemExit(f"{spec.name} stopped early ({out['stopped_by']}) without a final val loss; rerun to resume")
    N, fpt = shape_counts(spec.n_layer, spec.n_head, spec.n_embd, vocab_size=cfg.model.vocab_size,
                          block_size=cfg.model.block_size)
    D = out["step"] * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    tok_s = _median_tokens_per_s(out_dir / "metrics.jsonl")
    result = {"name": spec.name, "spec": asdict(spec), "extra": list(extra), "N": N, "N_total": out["n_params"],
              "D": D, "flops": fpt * D, "flops_per_token": fpt, "loss": out["final_val_loss"],
              "bigram_loss": out["bigram_val_loss"], "wall_s": wall, "tokens_per_s": tok_s,
              "budget": spec.budget, "resumed": resumed, "argv": argv}
    atomic_write(json.dumps(result, indent=1), done)
    return {**result, "skipped": False}


def run_grid(specs: list[Spec], data_dir: str, out_root: Path, extra: list[str] = ()) -> list[dict]:
    runs = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name}: {spec.steps} steps", flush=True)
        r = run_point(spec, data_dir, out_root, extra)
        print(f"    loss {r['loss']:.4f}, N {r['N']:,}, D {r['D']:,}, {r['wall_s']:.0f} s"
              + (" (already done: skipped)" if r["skipped"] else ""), flush=True)
        runs.append(r)
    return runs


# ----------------------------------------------------------------------------- budgets, mini_lm, the report


def bytes_per_token(data_dir: str | Path, split: str = "val") -> float | None:
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    b, t = meta.get("bytes", {}).get(split), meta.get("tokens", {}).get(split)
    return b / t if b and t else None


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                 platform.processor())
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in lscpu, "cores": os.cpu_count(), "load_1min": load,
            "python": platform.python_version()}


def budgets_report(point: dict, boots: list[dict], cpu_flops_per_s: float, t4_tokens_per_s: tuple[float, float],
                   vocab_size: int, block_size: int) -> dict:
    """Compute-optimal shapes for 5 minutes of this CPU and 4 hours of a T4 (the README's estimate)."""
    from minilm.config import get_preset

    mini = get_preset("mini_lm").model
    _, mini_fpt = shape_counts(mini.n_layer, mini.n_head, mini.n_embd, vocab_size=mini.vocab_size,
                               block_size=mini.block_size, preset="mini_lm")
    cases = {"cpu_5min": (300 * cpu_flops_per_s, "5 min of this CPU at the grid's measured FLOP/s"),
             "t4_4h_low": (4 * 3600 * t4_tokens_per_s[0] * mini_fpt, "4 h of a T4, README's low estimate"),
             "t4_4h_high": (4 * 3600 * t4_tokens_per_s[1] * mini_fpt, "4 h of a T4, README's high estimate")}
    out = {}
    for key, (flops, label) in cases.items():
        best = compute_optimal(point, flops, vocab_size=vocab_size, block_size=block_size)
        spread = [compute_optimal(b, flops, vocab_size=vocab_size, block_size=block_size) for b in boots[:40]]
        out[key] = {**best, "label": label, "N_interval": interval([s["N"] for s in spread]),
                    "D_interval": interval([s["D"] for s in spread])}
    return out


def mini_lm_prediction(point: dict, boots: list[dict], fit_bpt: float, target_bpt: float) -> dict:
    """mini_lm at its configured budget: the law's loss, as bits/byte and as perplexity on its own tokenizer.

    The law is in nats per token of the fit's tokenizer; bits per byte carries it across tokenizers, assuming
    the loss per byte of the fit's corpus holds for mini_lm's corpus. An extrapolation far outside the grid.
    """
    from minilm.config import get_preset

    cfg = get_preset("mini_lm")
    m, t = cfg.model, cfg.train
    N, _ = shape_counts(m.n_layer, m.n_head, m.n_embd, vocab_size=m.vocab_size, block_size=m.block_size,
                        preset="mini_lm")
    D = t.max_iters * t.batch_size * t.grad_accum * m.block_size
    p = prediction(point, boots, N, D)

    def ppl(nats_fit: float) -> float:
        return math.exp(nats_fit / fit_bpt * target_bpt)

    bpb = [v / math.log(2) / fit_bpt for v in (p["loss"], *p["interval"])]
    return {**p, "bits_per_byte": bpb[0], "bits_per_byte_interval": bpb[1:], "perplexity_target_tokens":
            ppl(p["loss"]), "perplexity_interval": [ppl(v) for v in p["interval"]],
            "fit_bytes_per_token": fit_bpt, "target_bytes_per_token": target_bpt}


def plot(report: dict, path: Path) -> None:
    """Left: the isoFLOP profiles (loss over N per budget, with the law). Right: loss over D per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = {k: report[k]["value"] for k in CONSTANTS}
    runs = report["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lv in report["isoflop"]["levels"]:
        group = sorted((r for r in runs if r["budget"] == lv["budget"]), key=lambda r: r["N"])
        line = ax1.plot([r["N"] for r in group], [r["loss"] for r in group], "o", label=f"C = {lv['flops']:.1e}")
        ns = np.geomspace(group[0]["N"] * 0.8, group[-1]["N"] * 1.25, 50)
        ax1.plot(ns, np.exp(np.polyval(lv["parabola"], np.log(ns))), ":", color=line[0].get_color())
        ax1.plot(lv["N_opt"], lv["loss_opt"], "*", ms=12, color=line[0].get_color())
    ax1.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final val loss (nats/token)",
            title="IsoFLOP profiles (approach 2): dotted = parabola, * = its minimum")
    ax1.legend(fontsize=8)
    widths = sorted({r["spec"]["n_embd"] for r in runs if r["budget"] > 0})
    for w in widths:
        group = sorted((r for r in runs if r["spec"]["n_embd"] == w and r["budget"] > 0), key=lambda r: r["D"])
        line = ax2.plot([r["D"] for r in group], [r["loss"] for r in group], "o", label=f"N = {group[0]['N']:,}")
        ds = np.geomspace(group[0]["D"] * 0.7, group[-1]["D"] * 1.5, 50)
        ax2.plot(ds, predict_loss(point, group[0]["N"], ds), "-", lw=1, color=line[0].get_color())
    held = report.get("held_out", {})
    if "measured" in held:
        lo, hi = held["predicted"]["interval"]
        ax2.errorbar([held["D"]], [held["predicted"]["loss"]], yerr=[[held["predicted"]["loss"] - lo],
                     [hi - held["predicted"]["loss"]]], fmt="s", color="k", capsize=4, label="held-out: predicted")
        ax2.plot([held["D"]], [held["measured"]], "x", color="red", ms=10, mew=2, label="held-out: measured")
    ax2.set(xscale="log", xlabel="training tokens D", ylabel="final val loss (nats/token)",
            title="Approach 3: L(N, D) fitted (lines) vs runs")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_report(runs: list[dict], n_boot: int, seed: int) -> tuple[dict, list[dict]]:
    N, D, L = (np.array([r[k] for r in runs], float) for k in ("N", "D", "loss"))
    point = fit_law(N, D, L)
    boots = bootstrap(N, D, L, n_boot=n_boot, seed=seed)
    return point, boots


def print_summary(report: dict) -> None:
    c = {k: report[k] for k in CONSTANTS}
    print("\nL(N, D) = E + A/N^alpha + B/D^beta, 95% bootstrap intervals over runs:")
    for k, v in c.items():
        print(f"  {k:5s} = {v['value']:.4g}  [{v['interval'][0]:.4g}, {v['interval'][1]:.4g}]")
    iso = report["isoflop"]
    if "N_opt_exponent" in iso:
        print(f"isoFLOP (approach 2): N_opt ~ C^{iso['N_opt_exponent']:.2f}, D_opt ~ C^{iso['D_opt_exponent']:.2f}"
              f" (vertex inside the sizes tried: {[lv['inside'] for lv in iso['levels']]})")
    for b in report["compute_optimal"].values():
        print(f"compute-optimal for {b['label']} ({b['flops']:.2e} FLOPs): n_layer={b['n_layer']} "
              f"n_embd={b['n_embd']}, N = {b['N']:,.0f} [{b['N_interval'][0]:,.0f}, {b['N_interval'][1]:,.0f}], "
              f"D = {b['D']:,.0f} tokens, predicted loss {b['loss']:.3f}")
    m = report["mini_lm"]
    print(f"mini_lm (N = {m['N']:,.0f} non-embedding, D = {m['D']:,.0f}): predicted {m['bits_per_byte']:.3f} "
          f"bits/byte [{m['bits_per_byte_interval'][0]:.3f}, {m['bits_per_byte_interval'][1]:.3f}], perplexity "
          f"{m['perplexity_target_tokens']:.1f} [{m['perplexity_interval'][0]:.1f}, {m['perplexity_interval'][1]:.1f}]"
          " on its 32k tokens (an extrapolation far beyond the grid)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m minilm.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default="data/builtin-8k")
    ap.add_argument("--out_dir", default="out/scaling", help="one run dir per grid point")
    ap.add_argument("--docs", default="docs", help="where scaling.json, scaling.md and scaling.png go")
    ap.add_argument("--n_boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit_only", action="store_true", help="fit the finished runs in --out_dir, train nothing")
    ap.add_argument("--t4_tokens_per_s", default="60000,91000",
                    help="the README's T4 estimate for mini_lm (low,high), an estimate, not a measurement")
    ap.add_argument("--target_bytes_per_token", type=float, default=3.81,
                    help="bytes/token of mini_lm's data dir (README: data/installed-32k), used when it is not built")
    ap.add_argument("--train_args", default="", help="extra minilm.train overrides for every run (tests)")
    ap.add_argument("--sizes", default="", help="n_layer:n_head:n_embd,... instead of the built-in sizes (tests)")
    ap.add_argument("--budgets", default="", help="FLOPs,... instead of the built-in budgets (tests)")
    ap.add_argument("--held_out", default="", help="n_layer:n_head:n_embd:FLOPs (tests); 'none' skips it")
    return ap.parse_args(argv)


def _triples(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def held_out_block(report: dict, point: dict, boots: list[dict], spec: Spec, shape_kw: dict, tps: int) -> dict:
    N, fpt = shape_counts(spec.n_layer, spec.n_head, spec.n_embd, **shape_kw)
    D = spec.steps * tps
    return {"name": spec.name, "spec": asdict(spec), "N": N, "D": D, "flops": fpt * D,
            "predicted": prediction(point, boots, N, D),
            "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "larger_than_fit": {"N": N > max(r["N"] for r in report["runs"]),
                                "flops": fpt * D > max(r["flops"] for r in report["runs"])}}


def earlier_prediction(path: Path, name: str) -> dict:
    """The held-out prediction recorded before that run trained, or a note that there is none."""
    try:
        old = json.loads(path.read_text()).get("held_out", {})
    except (OSError, json.JSONDecodeError):
        old = {}
    if old.get("name") == name and "predicted" in old:
        return {"predicted": old["predicted"], "predicted_at": old["predicted_at"]}
    return {"predicted_at": "after the run trained (no earlier report): not a blind prediction"}


def write_outputs(report: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write(json.dumps(report, indent=1), docs / "scaling.json")
    plot(report, docs / "scaling.png")


def main(argv: list[str] | None = None) -> int:
    from minilm.config import parse_args

    args = parse(argv)
    extra = args.train_args.split()
    base, _ = parse_args(["--preset=tiny", f"--data_dir={args.data_dir}", *extra], cuda=False)
    meta_path = Path(args.data_dir) / "meta.json"
    if not meta_path.is_file():  # the trainer builds the built-in data dirs; the shapes need the vocab first
        raise SystemExit(f"{args.data_dir} has no meta.json: build it first, e.g. python -m dataset_curation build "
                         f"--recipe builtin --out {args.data_dir} --vocab_size 8192")
    vocab = json.loads(meta_path.read_text())["vocab_size"]
    shape_kw = {"vocab_size": vocab, "block_size": base.model.block_size}
    tps = base.train.batch_size * base.train.grad_accum * base.model.block_size
    sizes = _triples(args.sizes) or SIZES
    budgets = tuple(float(b) for b in args.budgets.split(",") if b) or BUDGETS
    specs = grid_specs(sizes, budgets, tokens_per_step=tps, **shape_kw)
    out_root = Path(args.out_dir)
    if args.fit_only:
        runs = [json.loads((out_root / s.name / "result.json").read_text()) for s in specs
                if (out_root / s.name / "result.json").is_file()]
        print(f"--fit_only: {len(runs)} of {len(specs)} runs finished in {out_root}")
    else:
        runs = run_grid(specs, args.data_dir, out_root, extra)
    point, boots = fit_report(runs, args.n_boot, args.seed)
    cpu_flops = float(np.median([r["flops_per_token"] * r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]))
    fit_bpt = bytes_per_token(args.data_dir) or 1.0
    target_meta = Path(get_target_data_dir()) / "meta.json"
    target_bpt = bytes_per_token(target_meta.parent) if target_meta.is_file() else args.target_bytes_per_token
    t4 = tuple(float(v) for v in args.t4_tokens_per_s.split(","))
    report = {
        "command": "python -m minilm.scaling" + ("" if argv is None else " " + " ".join(argv)),
        "machine": machine(), "data_dir": args.data_dir, "N_counts": "non-embedding parameters",
        "flops": "training FLOPs = GPT.flops_per_token() x D (6N_total + 12 L C T per token)",
        "runs": [{k: r[k] for k in ("name", "N", "N_total", "D", "flops", "loss", "bigram_loss", "wall_s",
                                    "tokens_per_s", "budget", "spec")} for r in runs],
        **constants_with_intervals(point, boots), "huber": point["huber"], "n_boot": len(boots),
        "isoflop": isoflop(runs), "cpu_flops_per_s": cpu_flops,
        "compute_optimal": budgets_report(point, boots, cpu_flops, t4, **shape_kw),
        "mini_lm": mini_lm_prediction(point, boots, fit_bpt, target_bpt),
    }
    if args.held_out != "none":
        parts = args.held_out.split(":")
        held = (tuple(int(v) for v in parts[:3]), float(parts[3])) if args.held_out else HELD_OUT
        spec = held_out_spec(held, tokens_per_step=tps, **shape_kw)
        report["held_out"] = held_out_block(report, point, boots, spec, shape_kw, tps)
        if (out_root / spec.name / "result.json").is_file():  # trained already: keep the prediction made before
            report["held_out"].update(earlier_prediction(Path(args.docs) / "scaling.json", spec.name))
        write_outputs(report, Path(args.docs))  # the prediction is on disk before the run trains
        p = report["held_out"]["predicted"]
        print(f"held-out {spec.name}: predicted {p['loss']:.4f} [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]"
              " (written); training it now", flush=True)
        if not args.fit_only or (out_root / spec.name / "result.json").is_file():
            r = run_point(spec, args.data_dir, out_root, extra)
            lo, hi = p["interval"]
            report["held_out"].update(measured=r["loss"], wall_s=r["wall_s"], inside_interval=lo <= r["loss"] <= hi,
                                      error=r["loss"] - p["loss"])
            print(f"held-out measured {r['loss']:.4f}: {'inside' if lo <= r['loss'] <= hi else 'outside'} the "
                  f"interval (error {r['loss'] - p['loss']:+.4f})")
    write_outputs(report, Path(args.docs))
    atomic_write(markdown(report), Path(args.docs) / "scaling.md")
    print_summary(report)
    print(f"wrote {Path(args.docs) / 'scaling.json'}, scaling.md, scaling.png")
    return 0


def markdown(report: dict) -> str:
    """docs/scaling.md: the grid, the constants, the held-out check, the budgets and mini_lm's prediction."""
    m, iso = report["machine"], report["isoflop"]
    lines = ["# Scaling laws fitted on CPU runs", "",
             f"Regenerate: `{report['command']}` (writes this page, scaling.json and scaling.png). Machine: "
             f"{m['cpu']}, {m['cores']} cores, avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, 1-minute load "
             f"{m['load_1min']:.1f} when the report was written (a shared machine: other jobs ran beside the grid, "
             "so wall times and FLOP/s are loaded figures). Data: `" + report["data_dir"] + "`.", "",
             "Each run is the `tiny` preset at another depth and width, trained for a compute budget C (training "
             "FLOPs, " + report["flops"] + "); its loss is the trainer's final val loss over the whole val split "
             "(nats/token). N is the " + report["N_counts"] + " (the 8k embedding and head are left out: at these "
             "widths they are most of the weights).", "",
             "| run | N | D (tokens) | FLOPs | val loss | bigram | wall s |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['name']} | {r['N']:,} | {r['D']:,} | {r['flops']:.2e} | {r['loss']:.4f} | "
                     f"{r['bigram_loss']:.3f} | {r['wall_s']:.0f} |")
    lines += ["", "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
              "Huber loss (delta 1e-3) on log loss, L-BFGS from the best 8 points of Chinchilla's start grid; "
              f"95% intervals from {report['n_boot']} bootstrap resamples of the runs.", "",
              "| constant | value | 95% interval |", "|---|---|---|"]
    for k in CONSTANTS:
        v = report[k]
        lines.append(f"| {k} | {v['value']:.4g} | [{v['interval'][0]:.4g}, {v['interval'][1]:.4g}] |")
    lines += ["", "## Approach 2: isoFLOP profiles", "", "| C (FLOPs) | N_opt | D_opt | loss at N_opt | "
              "minimum inside the sizes tried |", "|---|---|---|---|---|"]
    for lv in iso["levels"]:
        lines.append(f"| {lv['flops']:.2e} | {lv['N_opt']:,.0f} | {lv['D_opt']:,.0f} | {lv['loss_opt']:.4f} | "
                     f"{'yes' if lv['inside'] else 'no'} |")
    if "N_opt_exponent" in iso:
        lines += ["", f"N_opt grows as C^{iso['N_opt_exponent']:.2f} and D_opt as C^{iso['D_opt_exponent']:.2f} "
                  "across these budgets (Chinchilla: about 0.5 each; three budgets decide little)."]
    held = report.get("held_out")
    if held:
        p = held["predicted"]
        lines += ["", "## The held-out run: predicted, then trained", "",
                  f"`{held['name']}`: N = {held['N']:,}, D = {held['D']:,}, {held['flops']:.2e} FLOPs, larger than "
                  "every run of the fit. Predicted (written to scaling.json at " + held["predicted_at"] +
                  f", before training): **{p['loss']:.4f}** [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]."]
        if "measured" in held:
            lines.append(f"Measured: **{held['measured']:.4f}** ({held['error']:+.4f}, "
                         f"{'inside' if held['inside_interval'] else 'outside'} the interval).")
    lines += ["", "## Compute-optimal shapes", "",
              f"This CPU ran the grid at a median {report['cpu_flops_per_s']:.2e} training FLOP/s. The search runs "
              "over the grid's family (n_layer = k, n_embd = 32k, k = 1-48) on this data dir's tokenizer. "
              "The T4 budgets use the README's **estimated** T4 tokens/s for mini_lm (not a measurement).", "",
              "| budget | FLOPs | n_layer x n_embd | N [95%] | D | tokens/param | predicted loss |",
              "|---|---|---|---|---|---|---|"]
    for b in report["compute_optimal"].values():
        lines.append(f"| {b['label']} | {b['flops']:.2e} | {b['n_layer']} x {b['n_embd']} | {b['N']:,.0f} "
                     f"[{b['N_interval'][0]:,.0f}, {b['N_interval'][1]:,.0f}] | {b['D']:,.0f} | "
                     f"{b['tokens_per_param']:.1f} | {b['loss']:.3f} |")
    mm = report["mini_lm"]
    lines += ["", "## mini_lm at its configured budget (predicted)", "",
              f"N = {mm['N']:,} non-embedding parameters, D = {mm['D']:,} tokens: predicted "
              f"**{mm['bits_per_byte']:.3f} bits/byte** [{mm['bits_per_byte_interval'][0]:.3f}, "
              f"{mm['bits_per_byte_interval'][1]:.3f}], i.e. val perplexity **{mm['perplexity_target_tokens']:.1f}**"
              f" [{mm['perplexity_interval'][0]:.1f}, {mm['perplexity_interval'][1]:.1f}] on its own 32k tokens "
              f"({mm['target_bytes_per_token']:.2f} bytes/token; the fit's data has {mm['fit_bytes_per_token']:.2f})."
              " What this assumes: the law holds 100x beyond the largest N and D fitted; loss per byte of the "
              "standard library carries over to `data/installed-32k` (both are Python source); mini_lm's tied "
              "embeddings and 512-token context change nothing. Each is doubtful, so treat the interval as the "
              "spread of the fit only, not of these assumptions.", "", "![scaling](scaling.png)", ""]
    return "\n".join(lines)


def get_target_data_dir() -> str:
    from minilm.config import get_preset

    return get_preset("mini_lm").train.data_dir


if __name__ == "__main__":
    sys.exit(main())
