"""The whole GPU project in one command: data, mini_lm's full schedule, evaluation, serving, and a report.

    make gpu-check                                    # on a CUDA machine: python -m minilm.gpu_check
    make gpu-check ARGS="--dry_run --out_dir DIR"     # the same code path on the CPU at tiny sizes (minutes)

Phases, each timed, with its peak memory: build data/installed-32k (all cores; skipped when built), a probe of
the first training steps whose tokens/s decide how many steps fit the training budget (--train_budget_s; the full
schedule when it fits, else as many steps as fit with the cosine schedule shortened to match, and the report says
what the full run would take), training, `minilm.evaluate` (perplexity, bits per byte, the completion task with
bootstrap intervals, decode tokens/s at batch 1), and `minilm.serve` under 8 concurrent clients
(`minilm.serve.loadtest`). Writes OUT/report.json and OUT/report.md: every brief target with the measured value
and the scaling-law prediction (docs/scaling.json), throughput, MFU, peak memory and wall time per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minilm.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parents[1]
# The brief's targets for the project model (README, "The brief's targets").
TARGETS = {
    "val_perplexity": ("<", 30.0, "validation perplexity"),
    "bleu": (">", 20.0, "BLEU on the completion task"),
    "decode_tokens_per_s": (">", 100.0, "generation tokens/s, one stream"),
    "train_hours": ("<", 4.0, "training time in hours (brief: on a T4; here: on this GPU)"),
    "params_millions": ("~", 50.0, "parameters, millions (50 +- 10%)"),
}


def sizes(dry_run: bool, out_dir: Path) -> dict:
    """Everything that differs between the real run and the dry run; the code path is the same."""
    if dry_run:
        return {"data_dir": out_dir / "data", "build": ["--recipe", "builtin", "--vocab_size", "512",
                                                       "--max_files", "120", "--set", "val_fraction=0.1"],
                "train": ["--preset=mini_lm", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
                          "--batch_size=8", "--grad_accum=1", "--max_iters=40", "--warmup_iters=4",
                          "--eval_interval=20", "--eval_iters=2", "--sample_tokens=0", "--dtype=float32"],
                "probe_steps": 6, "eval": {"max_tokens": 20000, "num_prompts": 40, "function_prompts": 16,
                                           "function_tokens": 24, "line_tokens": 12, "max_train_tokens": 200000,
                                           "bootstrap_samples": 200, "speed_tokens": 16},
                "load": {"requests": 16, "max_new_tokens": 16}, "device": "cpu"}
    return {"data_dir": ROOT / "data" / "installed-32k",
            "build": ["--recipe", "installed", "--vocab_size", "32000", "--num_proc", str(os.cpu_count() or 1)],
            "train": ["--preset=mini_lm", "--compile=true"], "probe_steps": 30,
            "eval": {"num_prompts": 360, "bootstrap_samples": 1000, "speed_tokens": 128},
            "load": {"requests": 64, "max_new_tokens": 64}, "device": "cuda"}


# ----------------------------------------------------------------------------- phases


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def start_phase(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def end_phase(report: dict, name: str, t0: float, device: str, **extra) -> None:
    row = {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), **extra}
    if device.startswith("cuda"):
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    report["phases"][name] = row
    print(f"[gpu-check] {name}: {row['wall_s']:.1f} s" + "".join(f", {k} {v:.4g}" if isinstance(v, float) else
                                                                f", {k} {v}" for k, v in extra.items()), flush=True)
    write_report(report)


def build_data(report: dict, s: dict) -> None:
    t0 = start_phase(s["device"])
    data_dir = Path(s["data_dir"])
    skipped = (data_dir / "meta.json").is_file()
    child_rss = None
    if not skipped:
        print(f"[gpu-check] building {data_dir} ...", flush=True)
        cmd = [sys.executable, "-m", "dataset_curation", "build", "--out", str(data_dir), *s["build"]]
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"building {data_dir} failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
        child_rss = usage.ru_maxrss / 1024
    meta = json.loads((data_dir / "meta.json").read_text())
    end_phase(report, "data", t0, s["device"], skipped=skipped, train_tokens=meta["tokens"]["train"],
              val_tokens=meta["tokens"]["val"], build_peak_rss_mb=child_rss)


def _rates(out_dir: Path) -> tuple[float | None, float | None]:
    """Median tokens/s and MFU of a run's logged steps (the first row holds start-up and compilation)."""
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("tokens_per_s")]
    rows = rows[1:] or rows
    tok = float(np.median([r["tokens_per_s"] for r in rows])) if rows else None
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return tok, (float(np.median(mfus)) if mfus else None)


def train_config(s: dict, out_dir: Path, extra: list[str]):
    from minilm.config import parse_args

    cfg, _ = parse_args([*s["train"], f"--data_dir={s['data_dir']}", f"--out_dir={out_dir}", f"--device={s['device']}",
                         "--progress=false", *extra])
    return cfg


def plan_steps(tokens_per_s: float, tokens_per_step: int, full_steps: int, budget_s: float) -> dict:
    """The full schedule when it fits budget_s at the measured rate, else as many steps as fit (at least 1)."""
    if not tokens_per_s or tokens_per_s <= 0:
        raise ValueError(f"the probe measured no training throughput ({tokens_per_s}); see the probe's train.log")
    full_s = full_steps * tokens_per_step / tokens_per_s
    steps = full_steps if full_s <= budget_s else max(1, int(budget_s * tokens_per_s / tokens_per_step))
    return {"tokens_per_s": tokens_per_s, "tokens_per_step": tokens_per_step, "full_steps": full_steps,
            "full_schedule_s": full_s, "budget_s": budget_s, "steps": steps, "fits": steps == full_steps}


def probe(report: dict, s: dict, out: Path, budget_s: float) -> int:
    """Train the first steps, measure tokens/s, and decide how many steps the budget holds."""
    from minilm.train import train

    t0 = start_phase(s["device"])
    n = s["probe_steps"]
    cfg = train_config(s, out / "probe", [f"--max_iters={n}", f"--eval_interval={n}", "--eval_iters=1",
                                          "--final_eval=false", "--tensorboard=false", "--log_interval=2"])
    full_steps = train_config(s, out / "probe", []).train.max_iters
    train(cfg, "gpu-check: probe")
    tok_s, mfu = _rates(out / "probe")
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    plan = report["train_plan"] = {"mfu": mfu, **plan_steps(tok_s, per_step, full_steps, budget_s)}
    steps, full_s = plan["steps"], plan["full_schedule_s"]
    say = (f"the full schedule ({full_steps:,} steps) needs {full_s / 60:.1f} min at {tok_s:,.0f} tokens/s: "
           + ("it fits the budget" if plan["fits"] else f"over the {budget_s / 60:.1f}-min budget, so {steps:,} "
              "steps run (cosine schedule shortened to match)"))
    print(f"[gpu-check] {say}", flush=True)
    end_phase(report, "probe", t0, s["device"], tokens_per_s=tok_s, plan=say)
    return steps


def train_run(report: dict, s: dict, out: Path, steps: int) -> Path:
    from minilm.train import train

    t0 = start_phase(s["device"])
    run_dir = out / "mini_lm"
    cfg = train_config(s, run_dir, [f"--max_iters={steps}", f"--lr_decay_iters={steps}"])
    result = train(cfg, "gpu-check: training")
    tok_s, mfu = _rates(run_dir)
    wall = time.perf_counter() - t0
    report["train"] = {"steps": result["step"], "params": result["n_params"], "final_val_loss":
                       result.get("final_val_loss"), "tokens": result["step"] * report["train_plan"]["tokens_per_step"],
                       "stopped_by": result["stopped_by"], "device": cfg.train.device}
    end_phase(report, "train", t0, s["device"], tokens_per_s=tok_s, mfu=mfu, steps=result["step"])
    report["phases"]["train"]["wall_s"] = wall
    return run_dir


def evaluate_run(report: dict, s: dict, run_dir: Path) -> None:
    from minilm.evaluate import evaluate

    t0 = start_phase(s["device"])
    r = evaluate(run_dir, device=s["device"], progress=False, **s["eval"])
    ppl = r["perplexity"]["non_overlapping"]
    task = r["task"].get("systems", {}).get("model", {}).get("all", {})
    ci = lambda m: {k: m[k] for k in ("value", "low", "high")} if m else None
    report["eval"] = {"val_perplexity": ppl["perplexity"], "val_loss": ppl["nll"],
                      "bits_per_byte": ppl["bits_per_byte"], "val_tokens": ppl["tokens"],
                      "whole_split": r["perplexity"]["whole_split"], "task_prompts": task.get("n"),
                      **{m: ci(task.get(m)) for m in ("bleu", "edit_sim", "exact", "chrf")},
                      "decode_tokens_per_s_batch1": r["speed"]["tokens_per_s"], "eval_json": str(run_dir / "eval.json")}
    end_phase(report, "evaluate", t0, s["device"], perplexity=ppl["perplexity"],
              decode_tokens_per_s=r["speed"]["tokens_per_s"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_load(report: dict, s: dict, run_dir: Path, clients: int = 8, wait_s: float = 300.0) -> None:
    """Start `python -m minilm.serve` on a free port, load-test it with 1 and then 8 clients, stop it."""
    import httpx

    from minilm.serve.loadtest import run_load

    t0 = start_phase(s["device"])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "minilm.serve", "--out_dir", str(run_dir), "--port", str(port),
                               "--device", s["device"], "--max_concurrency", str(clients), "--log_level", "warning"])
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if server.poll() is not None:
                raise SystemExit(f"minilm.serve exited with {server.returncode} before answering /health")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"minilm.serve did not answer {url}/health within {wait_s:.0f} s")
            time.sleep(0.5)
        load = s["load"]
        payload = {"prompt": "def ", "max_new_tokens": load["max_new_tokens"], "temperature": 0.8, "top_k": 50}
        one = asyncio.run(run_load(url, 1, max(4, load["requests"] // clients), payload))
        many = asyncio.run(run_load(url, clients, load["requests"], payload))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    keep = ("requests", "ok", "errors", "lost", "tokens_per_s", "requests_per_s", "p50_ms", "p95_ms", "p99_ms")
    report["serve"] = {"one_client": {k: one[k] for k in keep}, f"{clients}_clients": {k: many[k] for k in keep},
                       "clients": clients, "speedup": many["tokens_per_s"] / one["tokens_per_s"]
                       if one["tokens_per_s"] else None, "max_new_tokens": load["max_new_tokens"]}
    if many["errors"] or many["lost"]:
        report["problems"].append(f"load test: {many['errors']} errors, {many['lost']} lost of {many['requests']}")
    end_phase(report, "serve", t0, s["device"], tokens_per_s_8_clients=many["tokens_per_s"],
              tokens_per_s_1_client=one["tokens_per_s"])


# ----------------------------------------------------------------------------- the report


def scaling_prediction() -> dict | None:
    path = ROOT / "docs" / "scaling.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())["mini_lm"]
    return {"val_perplexity": m["perplexity_target_tokens"], "val_perplexity_interval": m["perplexity_interval"],
            "bits_per_byte": m["bits_per_byte"], "bits_per_byte_interval": m["bits_per_byte_interval"],
            "source": "docs/scaling.json (python -m minilm.scaling), for mini_lm at its configured budget"}


def targets(report: dict) -> list[dict]:
    ev, plan, tr = report.get("eval", {}), report.get("train_plan", {}), report.get("train", {})
    hours = report["phases"].get("train", {}).get("wall_s", math.nan) / 3600
    if plan and not plan.get("fits"):
        hours = plan["full_schedule_s"] / 3600  # what the full schedule would take on this device
    pred = report.get("scaling_prediction") or {}
    measured = {"val_perplexity": ev.get("val_perplexity"), "bleu": (ev.get("bleu") or {}).get("value"),
                "decode_tokens_per_s": ev.get("decode_tokens_per_s_batch1"), "train_hours": hours,
                "params_millions": tr.get("params", math.nan) / 1e6}
    rows = []
    for key, (op, target, label) in TARGETS.items():
        v = measured[key]
        ok = None if v is None or (isinstance(v, float) and math.isnan(v)) else (
            v < target if op == "<" else v > target if op == ">" else abs(v - target) <= 0.1 * target)
        rows.append({"metric": key, "label": label, "target": f"{op} {target:g}", "measured": v, "met": ok,
                     "predicted": pred.get(key), "predicted_interval": pred.get(f"{key}_interval")})
    return rows


def write_report(report: dict) -> None:
    out = Path(report["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    report["targets"] = targets(report)
    atomic_write(json.dumps(report, indent=1, default=str), out / "report.json")
    atomic_write(markdown(report), out / "report.md")


def _f(v, spec: str = ".4g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(report: dict) -> str:
    lines = [f"# gpu-check report{' (dry run: tiny sizes on the CPU)' if report['dry_run'] else ''}", "",
             f"Command: `{report['command']}`. Device: {report['device_name']}. Started {report['started']}.", "",
             "| target | brief | measured | met | scaling-law prediction |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        pi = t["predicted_interval"]
        pred = _f(t["predicted"]) + (f" [{_f(pi[0])}, {_f(pi[1])}]" if pi else "")
        met = {True: "yes", False: "no", None: "n/a"}[t["met"]]
        lines.append(f"| {t['label']} | {t['target']} | {_f(t['measured'])} | {met} | {pred} |")
    plan = report.get("train_plan")
    if plan:
        lines += ["", f"Training plan: probe {_f(plan['tokens_per_s'], ',.0f')} tokens/s; full schedule "
                  f"{plan['full_steps']:,} steps = {plan['full_schedule_s'] / 60:.1f} min; budget "
                  f"{plan['budget_s'] / 60:.1f} min; ran {plan['steps']:,} steps"
                  + ("" if plan["fits"] else " (the full schedule did not fit)") + "."]
    if "serve" in report:
        sv = report["serve"]
        many = sv[f"{sv['clients']}_clients"]
        lines += ["", f"Serving: {sv['clients']} concurrent clients {_f(many['tokens_per_s'], '.1f')} tokens/s "
                  f"(1 client {_f(sv['one_client']['tokens_per_s'], '.1f')}), p50 {_f(many['p50_ms'], '.0f')} ms, "
                  f"p95 {_f(many['p95_ms'], '.0f')} ms, {many['errors']} errors, {many['lost']} lost."]
    lines += ["", "| phase | wall s | tokens/s | MFU | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|---|"]
    for name, ph in report["phases"].items():
        if isinstance(ph, dict):
            lines.append(f"| {name} | {ph['wall_s']:.1f} | {_f(ph.get('tokens_per_s'), ',.0f')} | "
                         f"{_f(ph.get('mfu'), '.1%')} | {ph['peak_rss_mb']:.0f} | {_f(ph.get('peak_gpu_mb'), '.0f')} |")
    if report["problems"]:
        lines += ["", "Problems: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m minilm.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", default="out/gpu_check")
    ap.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU: the same code path, minutes")
    ap.add_argument("--train_budget_s", type=float, default=330.0,
                    help="seconds of training the plan allows (the default leaves the rest of 10 H100 minutes to "
                         "data, evaluation and serving)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device. gpu-check trains mini_lm at full size and needs a GPU; on a CPU run "
              "`make gpu-check ARGS=\"--dry_run --out_dir out/gpu_check_dry\"` (the same code path, tiny sizes)",
              file=sys.stderr)
        return 2
    out = Path(a.out_dir)
    s = sizes(a.dry_run, out)
    report = {"out_dir": str(out), "dry_run": a.dry_run, "command": "python -m minilm.gpu_check "
              + " ".join(sys.argv[1:] if argv is None else argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
              "device_name": torch.cuda.get_device_name(0) if s["device"] == "cuda" else "CPU",
              "phases": {}, "problems": [], "scaling_prediction": scaling_prediction()}
    t0 = time.perf_counter()
    build_data(report, s)
    steps = probe(report, s, out, a.train_budget_s)
    run_dir = train_run(report, s, out, steps)
    evaluate_run(report, s, run_dir)
    serve_and_load(report, s, run_dir)
    report["total_wall_s"] = time.perf_counter() - t0
    write_report(report)
    print(markdown(report))
    print(f"[gpu-check] wrote {out / 'report.json'} and {out / 'report.md'} ({report['total_wall_s'] / 60:.1f} min)")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
