"""Which of the five course tasks are done, judged from the learner's files and the self-check log.

    python -m course status [--data_dir data/builtin-8k] [--out_dir out/tiny] [--target_tokens 1000000]
                            [--config configs/my_run.yaml] [--bench_dir out/bench]

Every task needs real artefacts and its self-checks passed with the learner's own code: the data dir holding the
token target (1), the metric checks (2), a config that loads and a benchmark JSON (3), a trained run whose
eval.json shows validation loss below the bigram baseline (4), and eval.md plus a load-test result (5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from course.check import log_path, read_log

# task number -> (title, self-checks whose latest verdict must be PASS)
TASKS = {
    1: ("Curation", ("dup_lines", "minhash", "lsh_candidates", "clusters", "choose_bands", "bpe", "bpe_encode")),
    2: ("Metrics", ("perplexity", "bleu", "rouge")),
    3: ("Training setup", ("loss_scaler", "adamw", "lr_schedule", "clip_grad_norm", "accumulate")),
    4: ("Training", ("attention", "causal_self_attention", "layer_norm", "rms_norm", "mlp", "block", "rope",
                     "cross_entropy", "gpt", "overfit", "adamw_optimizer", "newton_schulz", "muon",
                     "optimizer_groups", "get_batch", "checkpoint_resume", "train_loop")),
    5: ("Evaluation and deployment", ("sampling",)),
}
LOADTEST_FILE = "loadtest.json"  # python -m minilm.serve.loadtest ... --json > out/<run>/loadtest.json

PASS, FAIL, REFERENCE = "PASS", "FAIL", "PASS with the reference"


def latest_verdicts(log: str | Path | None = None) -> dict[str, str]:
    """check name -> its most recent verdict: PASS, FAIL, or a pass of the reference code itself (not counted)."""
    out = {}
    for row in read_log(log):
        if "check" in row:
            out[row["check"]] = (REFERENCE if row.get("reference") else PASS) if row.get("passed") else FAIL
    return out


def _data_dir_state(data_dir: Path, target_tokens: int) -> tuple[bool, str]:
    from minilm.data import DataError, read_meta

    try:
        meta = read_meta(data_dir)
    except DataError as e:
        return False, str(e).split(";")[0]
    missing = [f for f in ("train.bin", "val.bin", meta.get("tokenizer", "tokenizer.json")) if
               not (data_dir / f).is_file()]
    if missing:
        return False, f"{data_dir} lacks {', '.join(missing)}"
    tokens = meta.get("tokens", {})
    n = int(tokens.get("train", 0)) + int(tokens.get("val", 0))
    if n < target_tokens:
        return False, f"{data_dir}: {n:,} tokens, below the target of {target_tokens:,} (--target_tokens)"
    return True, f"{data_dir}: {n:,} tokens (target {target_tokens:,}), vocab {meta['vocab_size']:,}"


def _setup_state(config: Path, bench_dir: Path) -> tuple[bool, str]:
    """Task 3: a config that minilm loads, and a benchmark JSON with measured rows."""
    from minilm.config import ConfigError, parse_args

    if not config.is_file():
        return False, (f"no {config}: write your week-18 config there (flat `key: value` lines, e.g. "
                       "`preset: mini_lm`, `batch_size: 16`) and pass --config to status if it lives elsewhere")
    try:
        cfg, _ = parse_args(["--config", str(config)], cuda=False)
    except (ConfigError, SystemExit, ValueError, OSError) as e:
        return False, f"{config} does not load: {e}"
    found = sorted(bench_dir.glob("bench_*.json")) if bench_dir.is_dir() else []
    for path in found:
        try:
            rows = json.loads(path.read_text()).get("rows")
        except (json.JSONDecodeError, AttributeError):
            continue
        if rows:
            return True, (f"{config} (preset {cfg.train.preset}, batch {cfg.train.batch_size} x {cfg.train.grad_accum}"
                          f", dtype {cfg.train.dtype}); benchmark {path} ({len(rows)} rows)")
    return False, (f"{config} loads, but no benchmark JSON with rows in {bench_dir}: run "
                   f"`python -m efficient_training.bench --out {bench_dir}`")


def _run_state(out_dir: Path) -> tuple[bool, str]:
    """Task 4: a finished run whose evaluation beats the bigram baseline on the same validation tokens."""
    from minilm.checkpoint import CheckpointError, load_checkpoint

    missing = [f for f in ("ckpt.pt", "config.yaml", "metrics.jsonl") if not (out_dir / f).is_file()]
    if missing:
        return False, (f"{out_dir} lacks {', '.join(missing)}: train with "
                       f"`python -m minilm.train --out_dir {out_dir}`")
    try:
        ckpt = load_checkpoint(out_dir)
    except CheckpointError as e:
        return False, str(e)
    step = int(ckpt.get("step", 0))
    path = out_dir / "eval.json"
    if not path.is_file():
        return False, f"{out_dir}: step {step:,}; no eval.json yet: run `python -m minilm.evaluate --out_dir {out_dir}`"
    try:
        r = json.loads(path.read_text())
        model, bigram = float(r["perplexity"]["sliding"]["nll"]), float(r["baselines"]["bigram"]["nll"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return False, f"{path} is not minilm.evaluate's output ({type(e).__name__}: {e}); rerun the evaluation"
    if not (math.isfinite(model) and model < bigram):
        return False, (f"{out_dir}: step {step:,}, validation loss {model:.4f} (perplexity {math.exp(model):.1f}) is "
                       f"not below the bigram baseline's {bigram:.4f} ({math.exp(bigram):.1f}): train longer or larger")
    return True, (f"{out_dir}: step {step:,}, validation loss {model:.4f} (perplexity {math.exp(model):.2f}) below "
                  f"the bigram baseline's {bigram:.4f} ({math.exp(bigram):.2f})")


def _deploy_state(out_dir: Path) -> tuple[bool, str]:
    """Task 5: the evaluation report and a load test of the served model without errors."""
    missing = [f for f in ("eval.json", "eval.md") if not (out_dir / f).is_file()]
    if missing:
        return False, (f"no {' or '.join(str(out_dir / f) for f in missing)}: run "
                       f"`python -m minilm.evaluate --out_dir {out_dir}`")
    try:
        json.loads((out_dir / "eval.json").read_text())
    except json.JSONDecodeError as e:
        return False, f"{out_dir / 'eval.json'} is not valid JSON ({e}); rerun the evaluation"
    path = out_dir / LOADTEST_FILE
    how = (f"serve the run (`python -m minilm.serve --out_dir {out_dir}`), then `python -m minilm.serve.loadtest "
           f"--concurrency 8 --requests 200 --json > {path}`")
    if not path.is_file():
        return False, f"eval.json and eval.md found; no load test yet: {how}"
    result = None
    for line in path.read_text(errors="replace").splitlines():  # the --json line among the printed report
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "errors" in row:
            result = row
    if result is None:
        return False, f"{path} holds no load-test JSON line (run the load test with --json): {how}"
    if result.get("errors") or result.get("lost"):
        return False, f"{path}: {result.get('errors')} errors, {result.get('lost', 0)} lost requests; fix and rerun"
    return True, f"eval.json, eval.md and {path} ({result.get('requests', '?')} requests, no errors)"


def _resolve(path: str | Path) -> Path:
    """A relative path as given from the current directory; failing that, from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[1]
    return root / p if (root / p).exists() else p


def status(data_dir: str | Path = "data/builtin-8k", out_dir: str | Path = "out/tiny",
           target_tokens: int = 1_000_000, log: str | Path | None = None, config: str | Path = "configs/my_run.yaml",
           bench_dir: str | Path = "out/bench") -> list[dict]:
    """One dict per task: {"task", "title", "done", "artifact_ok", "artifact", "checks": {name: verdict or None}}.

    A check counts when its latest verdict is PASS with the learner's own code; a pass of the reference does not.
    """
    verdicts = latest_verdicts(log)
    data_dir, out_dir = _resolve(data_dir), _resolve(out_dir)
    artifacts = {
        1: _data_dir_state(data_dir, target_tokens),
        2: (True, "your perplexity, BLEU and ROUGE functions: judged by their checks"),
        3: _setup_state(_resolve(config), _resolve(bench_dir)),
        4: _run_state(out_dir),
        5: _deploy_state(out_dir),
    }
    rows = []
    for task, (title, checks) in TASKS.items():
        ok, detail = artifacts[task]
        got = {c: verdicts.get(c) for c in checks}
        rows.append({"task": task, "title": title, "done": ok and all(v == PASS for v in got.values()),
                     "artifact_ok": ok, "artifact": detail, "checks": got})
    return rows


def format_status(rows: list[dict], log: str | Path | None = None) -> str:
    lines = [f"course status (self-check log: {Path(log) if log else log_path()})"]
    for r in rows:
        mark = "x" if r["done"] else " "
        checks = ", ".join(f"{c} {v or 'not run'}" for c, v in r["checks"].items())
        lines.append(f"[{mark}] task {r['task']} {r['title']}")
        lines.append(f"      {'ok ' if r['artifact_ok'] else 'to do'}  {r['artifact']}")
        lines.append(f"      checks: {checks}")
    done = sum(r["done"] for r in rows)
    lines.append(f"{done} of {len(rows)} tasks done")
    return "\n".join(lines)
