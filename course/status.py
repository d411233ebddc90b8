"""Which of the five course tasks are done, judged from the learner's artifacts and the self-check log.

    python -m course status [--data_dir data/builtin-8k] [--out_dir out/tiny] [--target_tokens 1000000]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from course.check import log_path, read_log

# task number -> (title, self-checks whose latest verdict must be PASS)
TASKS = {
    1: ("Curation", ("minhash", "bpe")),
    2: ("Metrics", ("perplexity", "bleu", "rouge")),
    3: ("Training setup", ("loss_scaler",)),
    4: ("Training", ("attention", "causal_self_attention")),
    5: ("Evaluation and deployment", ("sampling",)),
}


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


def _run_state(out_dir: Path) -> tuple[bool, str]:
    from minilm.checkpoint import CheckpointError, load_checkpoint

    if not (out_dir / "ckpt.pt").is_file():
        return False, f"no {out_dir / 'ckpt.pt'}: train with `python -m minilm.train --out_dir {out_dir}`"
    try:
        ckpt = load_checkpoint(out_dir)
    except CheckpointError as e:
        return False, str(e)
    step, best = int(ckpt.get("step", 0)), float(ckpt.get("best_val_loss", math.inf))
    if step <= 0 or not math.isfinite(best):
        return False, f"{out_dir}: step {step}, best val loss {best}: the run has not evaluated yet; train longer"
    return True, f"{out_dir}: step {step:,}, best val loss {best:.4f} (perplexity {math.exp(best):.2f})"


def _eval_state(out_dir: Path) -> tuple[bool, str]:
    path = out_dir / "eval.json"
    if not path.is_file():
        return False, f"no {path}: run `python -m minilm.evaluate --out_dir {out_dir}`"
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return False, f"{path} is not valid JSON ({e}); rerun the evaluation"
    return True, f"{path} found"


def _resolve(path: str | Path) -> Path:
    """A relative path as given from the current directory; failing that, from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[1]
    return root / p if (root / p).exists() else p


def status(data_dir: str | Path = "data/builtin-8k", out_dir: str | Path = "out/tiny",
           target_tokens: int = 1_000_000, log: str | Path | None = None) -> list[dict]:
    """One dict per task: {"task", "title", "done", "artifact_ok", "artifact", "checks": {name: verdict or None}}.

    A check counts when its latest verdict is PASS with the learner's own code; a pass of the shipped reference
    call (the notebooks' default) does not.
    """
    verdicts = latest_verdicts(log)
    data_dir, out_dir = _resolve(data_dir), _resolve(out_dir)
    artifacts = {
        1: _data_dir_state(data_dir, target_tokens),
        2: (True, "your functions (checked below)"),
        3: (True, "your scaler (checked below); a config in configs/ of your choice"),
        4: _run_state(out_dir),
        5: _eval_state(out_dir),
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
