"""Which of the five course tasks are done, judged from the learner's files and the self-check log.

    python -m course status [--data_dir data/builtin-8k] [--out_dir out/my_run] [--target_tokens 1000000]
                            [--config configs/my_run.yaml] [--bench_dir out/bench] [--device auto]

A task counts when its self-checks passed with the learner's own code (a pass that called the reference does not)
and its files are what they claim, read by content: (1) train.bin/val.bin whose sizes match meta.json's token
counts and dtype, a tokenizer that loads, the token target; (3) a config that loads with `--config` and an
efficient_training.bench JSON with measured rows; (4) the learner's own run (their loop, model and optimizer, as
extra records): its checkpoint loads into a GPT whose loss over the whole val split, recomputed here, is below an
add-k bigram counted here on the same tokens (course/status_run.py); (5) eval.json that agrees with that
checkpoint, eval.md, and a minilm.serve.loadtest result of >= 200 requests without errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from course.check import log_path, read_log

# task number -> (title, self-checks whose latest verdict must be PASS)
TASKS = {
    1: ("Curation", ("dup_lines", "minhash", "lsh_candidates", "clusters", "choose_bands", "bpe", "bpe_incremental",
                  "bpe_encode", "decontaminate")),
    2: ("Metrics", ("perplexity", "bleu", "rouge")),
    3: ("Training setup", ("loss_scaler", "adamw", "lr_schedule", "clip_grad_norm", "accumulate",
                           "activation_checkpoint", "ddp_all_reduce")),
    4: ("Training", ("attention", "causal_self_attention", "layer_norm", "rms_norm", "mlp", "block", "rope",
                     "cross_entropy", "gpt", "overfit", "adamw_optimizer", "newton_schulz", "muon",
                     "optimizer_groups", "get_batch", "checkpoint_resume", "train_loop", "flash_attention",
                     "ablation")),
    5: ("Evaluation and deployment", ("sampling", "addk_bigram", "bootstrap_ci", "generate")),
}
LOADTEST_FILE = "loadtest.json"  # python -m minilm.serve.loadtest ... --json > out/<run>/loadtest.json
# the fields of minilm.serve.loadtest.run_load's result that status reads
LOADTEST_FIELDS = ("url", "concurrency", "requests", "ok", "errors", "lost", "status_counts", "wall_s",
                   "requests_per_s", "tokens", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms")

PASS, FAIL, REFERENCE = "PASS", "FAIL", "PASS with the reference"


def latest_verdicts(log: str | Path | None = None) -> dict[str, str]:
    """check name -> its most recent verdict: PASS, FAIL, or a pass of the reference code itself (not counted)."""
    out = {}
    for row in read_log(log):
        if "check" in row:
            out[row["check"]] = (REFERENCE if row.get("reference") else PASS) if row.get("passed") else FAIL
    return out


def _split_problem(data_dir: Path, meta: dict, split: str) -> tuple[int, str | None]:
    """(tokens in SPLIT.bin counted from its size, what is wrong with it or None)."""
    path, dtype = data_dir / f"{split}.bin", np.dtype(meta["dtype"])
    rebuild = "rebuild the data dir (`python -m dataset_curation build ...`)"
    if not path.is_file():
        return 0, f"{path} is missing; {rebuild}"
    size = path.stat().st_size
    n, claimed = size // dtype.itemsize, (meta.get("tokens") or {}).get(split)
    if size % dtype.itemsize:
        return n, f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens; {rebuild}"
    if claimed is None:
        return n, f"{data_dir / 'meta.json'} has no token count for {split} (tokens.{split}); {rebuild}"
    if n != claimed:
        return n, (f"{path} holds {n:,} {dtype.name} tokens ({size:,} bytes) but meta.json claims {int(claimed):,}: "
                   f"the file is empty, truncated or stale; {rebuild}")
    if n == 0:
        return 0, f"{path} is empty; {rebuild} from more text"
    ids = np.memmap(path, dtype=dtype, mode="r")
    top = max(int(ids[i : i + (1 << 24)].max()) for i in range(0, n, 1 << 24))
    if top >= meta["vocab_size"]:
        return n, f"{path} holds token id {top} >= vocab_size {meta['vocab_size']} (another tokenizer); {rebuild}"
    return n, None


def _data_dir_state(data_dir: Path, target_tokens: int) -> tuple[bool, str]:
    """Task 1: token files whose sizes are what meta.json claims, a tokenizer that loads, the token target."""
    from minilm.data import DataError, read_meta

    try:
        meta = read_meta(data_dir)
    except DataError as e:
        return False, str(e).split(";")[0]
    n = 0
    for split in ("train", "val"):
        count, problem = _split_problem(data_dir, meta, split)
        if problem:
            return False, problem
        n += count
    path = data_dir / meta.get("tokenizer", "tokenizer.json")
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as e:  # tokenizers raises its own Exception type for a missing or malformed file
        return False, (f"{path} does not load with `tokenizers` ({str(e)[:160]}): save the trained tokenizer "
                       "there (tokenizer.save(path)) or rebuild the data dir")
    if vocab != meta["vocab_size"]:
        return False, f"{path} has {vocab:,} tokens but meta.json says vocab_size {meta['vocab_size']:,}: rebuild"
    if n < target_tokens:
        return False, f"{data_dir}: {n:,} tokens, below the target of {target_tokens:,} (--target_tokens)"
    return True, f"{data_dir}: {n:,} tokens (target {target_tokens:,}), vocab {meta['vocab_size']:,}"


def _measured_rows(path: Path) -> list[dict] | None:
    """The rows of an efficient_training.bench JSON when every one holds a measured time and rate, else None."""
    try:
        rows = json.loads(path.read_text()).get("rows")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and positive(r.get("ms")) and positive(r.get("tok_s"))
        for r in rows)
    return rows if ok else None


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
    found = sorted(bench_dir.glob("bench_*.json"), key=lambda p: p.stat().st_mtime) if bench_dir.is_dir() else []
    for path in reversed(found):
        rows = _measured_rows(path)
        if rows:
            return True, (f"{config} (preset {cfg.train.preset}, batch {cfg.train.batch_size} x {cfg.train.grad_accum}"
                          f", dtype {cfg.train.dtype}); benchmark {path} ({len(rows)} measured rows)")
    how = f"run `python -m efficient_training.bench --out {bench_dir}`"
    if found:
        return False, (f"{config} loads, but {', '.join(str(p) for p in found)} hold no measured rows (each needs a "
                       f"name and ms, tok_s > 0, as efficient_training.bench writes them): {how}")
    return False, f"{config} loads, but no benchmark JSON in {bench_dir}: {how}"


def _loadtest_problem(r: dict, min_requests: int) -> str | None:
    """What makes r not a clean minilm.serve.loadtest result of >= min_requests requests (None when it is one)."""
    missing = [k for k in LOADTEST_FIELDS if k not in r]
    if missing:
        return f"it lacks {', '.join(missing)}, so minilm.serve.loadtest did not write it"
    if not all(isinstance(r[k], (int, float)) for k in LOADTEST_FIELDS if k not in ("url", "status_counts")):
        return "its counts and timings are not numbers"
    if r["requests"] < min_requests:
        return f"{r['requests']} requests, fewer than the {min_requests} the task asks for"
    if r["errors"] or r["lost"] or r["ok"] != r["requests"]:
        return f"{r['errors']} errors, {r['lost']} lost requests ({r['ok']} of {r['requests']} answered); fix and rerun"
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-6)
    if not (r["wall_s"] > 0 and r["tokens"] > 0 and close(r["requests_per_s"], r["ok"] / r["wall_s"])
            and close(r["tokens_per_s"], r["tokens"] / r["wall_s"]) and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
            and r["status_counts"] == {"200": r["ok"]}):
        return "its rates, percentiles and status counts do not fit together: it was not measured as written"
    return None


def _deploy_state(out_dir: Path, eval_ok: bool, eval_detail: str, min_requests: int = 200) -> tuple[bool, str]:
    """Task 5: eval.json (agreeing with the checkpoint) and eval.md, and a clean load test of the served model."""
    missing = [f for f in ("eval.json", "eval.md") if not (out_dir / f).is_file()]
    if missing:
        return False, (f"no {' or '.join(str(out_dir / f) for f in missing)}: run "
                       f"`python -m minilm.evaluate --out_dir {out_dir}`")
    if not eval_ok:
        return False, eval_detail
    path = out_dir / LOADTEST_FILE
    how = (f"serve the run (`python -m minilm.serve --out_dir {out_dir}`), then `python -m minilm.serve.loadtest "
           f"--concurrency 8 --requests {min_requests} --json > {path}`")
    if not path.is_file():
        return False, f"eval.json and eval.md found; no load test yet: {how}"
    result = None
    for line in path.read_text(errors="replace").splitlines():  # the --json line among the printed report
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            result = row
    if result is None:
        return False, f"{path} holds no load-test JSON line (run the load test with --json): {how}"
    problem = _loadtest_problem(result, min_requests)
    if problem:
        return False, f"{path}: {problem}; {how}"
    return True, (f"eval.json (agrees with ckpt.pt), eval.md and {path} ({result['requests']} requests, "
                  f"{result['concurrency']} clients, p95 {result['p95_ms']:.0f} ms, no errors)")


def resolve(path: str | Path) -> Path:
    """A relative path as given from the current directory; failing that, from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[1]
    return root / p if (root / p).exists() else p


def status(data_dir: str | Path = "data/builtin-8k", out_dir: str | Path = "out/my_run",
           target_tokens: int = 1_000_000, log: str | Path | None = None, config: str | Path = "configs/my_run.yaml",
           bench_dir: str | Path = "out/bench", device: str = "auto", progress: bool = True) -> list[dict]:
    """One dict per task: {"task", "title", "done", "artifact_ok", "artifact", "checks": {name: verdict or None}}.

    A check counts when its latest verdict is PASS with the learner's own code; a pass of the reference does not.
    Task 4 scores the run's model on the whole validation split on `device` (auto: cuda, mps or cpu).
    """
    from course.status_run import run_state
    from minilm.device import pick_device

    verdicts = latest_verdicts(log)
    data_dir, out_dir = resolve(data_dir), resolve(out_dir)
    run = run_state(out_dir, data_dir, pick_device(device), progress)
    artifacts = {
        1: _data_dir_state(data_dir, target_tokens),
        2: (True, "your perplexity, BLEU and ROUGE functions: judged by their checks"),
        3: _setup_state(resolve(config), resolve(bench_dir)),
        4: (run["ok"], run["detail"]),
        5: _deploy_state(out_dir, run["eval_ok"], run["eval_detail"]),
    }
    rows = []
    for task, (title, checks) in TASKS.items():
        ok, detail = artifacts[task]
        got = {c: verdicts.get(c) for c in checks}
        rows.append({"task": task, "title": title, "done": ok and all(v == PASS for v in got.values()),
                     "artifact_ok": ok, "artifact": detail, "checks": got})
    return rows


def format_status(rows: list[dict], log: str | Path | None = None) -> str:
    """The table `python -m course status` prints: per task its files' verdict and each check's latest verdict."""
    lines = [f"course status (self-check log: {Path(log) if log else log_path()})"]
    shown = {PASS: "PASS", FAIL: "FAIL", REFERENCE: "PASS with the reference (not counted)", None: "not run"}
    for r in rows:
        mark = "x" if r["done"] else " "
        yours = sum(v == PASS for v in r["checks"].values())
        checks = ", ".join(f"{c} {shown.get(v, v)}" for c, v in r["checks"].items())
        lines.append(f"[{mark}] task {r['task']} {r['title']}")
        lines.append(f"      {'ok ' if r['artifact_ok'] else 'to do'}  {r['artifact']}")
        lines.append(f"      checks ({yours} of {len(r['checks'])} passed by your own code): {checks}")
    if any(v == REFERENCE for r in rows for v in r["checks"].values()):
        lines.append("A check passed with the reference called the package's or torch's own version while it ran: "
                     "it does not count; write it yourself and run the check again.")
    done = sum(r["done"] for r in rows)
    lines.append(f"{done} of {len(rows)} tasks done")
    return "\n".join(lines)
