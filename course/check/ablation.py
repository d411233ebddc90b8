"""Self-check for the learner's own ablation: every variant trained by their stack at equal tokens and at equal
time, each number in the table read back from the run dirs it names."""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from course.check._harness import Result, _check, _crash, _finish, _model_config, _seed, watching
from course.check.stack import WATCH_TRAIN, _markov_data_dir, _read_rows

SWITCHES = ({"qk_norm": False}, {"mlp": "gelu"}, {"norm": "layernorm"}, {"n_embd": 48}, {"pos": "learned"})
ROW_KEYS = ("variant", "changes", "params", "tokens_per_s", "equal_tokens", "equal_time")


def _run_problem(run: dict, where: str, config, changes: dict, steps: int, val_tokens) -> tuple[str, object]:
    """(what is wrong with one run of a row, empty if nothing; the model loaded from it)."""
    from minilm.checkpoint import model_from_checkpoint
    from minilm.data import whole_split_loss

    try:
        model, ckpt = model_from_checkpoint(run["run"], ema=False)
    except Exception as e:
        return f"{where}: the run dir {run.get('run')!r} does not load ({type(e).__name__}: {str(e)[:200]})", None
    extra, saved = ckpt.get("extra", {}), ckpt["config"]["model"]
    if extra.get("trainer") != "learner":
        return f"{where}: {run['run']} was not written by your my_train (extra {extra})", None
    want = dataclasses.asdict(dataclasses.replace(config, **changes))
    off = [k for k in want if k in saved and saved[k] != want[k]]
    if off:
        return (f"{where}: the run's model config has {off[0]}={saved[off[0]]!r}, the variant asks for "
                f"{want[off[0]]!r}: build each variant's model from dataclasses.replace(config, **changes)"), None
    if ckpt.get("step") != steps or run.get("steps") != steps:
        return (f"{where}: expected {steps} steps, the row says {run.get('steps')!r} and the checkpoint "
                f"{ckpt.get('step')!r}"), None
    val = whole_split_loss(model, val_tokens, 16)
    if not math.isclose(val, run.get("val_loss", float("nan")), rel_tol=1e-4):
        return (f"{where}: val_loss {run.get('val_loss')!r}, but the saved model scores {val:.6f} over the whole "
                "val split: report my_train's final_val_loss, not the sampled estimate"), None
    return "", model


def _row_problem(row: dict, name: str, changes: dict, config, per_step: int, tokens: int, seconds: float,
                 val_tokens) -> str:
    if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
        return f"each row needs the keys {ROW_KEYS}; got {sorted(row) if isinstance(row, dict) else row!r}"
    if row["variant"] != name or dict(row["changes"]) != changes:
        return f"rows must follow the variants in order: expected {name!r} {changes}, got {row['variant']!r}"
    steps = max(1, tokens // per_step)
    problem, model = _run_problem(row["equal_tokens"], f"{name!r} at equal tokens", config, changes, steps,
                                  val_tokens)
    if problem:
        return problem
    params = sum(p.numel() for p in model.parameters())
    if row["params"] != params:
        return f"{name!r}: params {row['params']!r}, the saved model has {params}"
    rates = [r["tokens_per_s"] for r in _read_rows(Path(row["equal_tokens"]["run"])) if r.get("tokens_per_s")]
    speed = statistics.median(rates[1:] or rates)
    if not math.isclose(row["tokens_per_s"], speed, rel_tol=1e-9):
        return (f"{name!r}: tokens_per_s {row['tokens_per_s']!r}, but the equal-tokens run's metrics.jsonl rows "
                f"give {speed:.1f} (the median after the first row)")
    time_steps = max(1, round(seconds * speed / per_step))
    if abs(row["equal_time"].get("steps", -9) - time_steps) > 1:
        return (f"{name!r}: equal time is {seconds} s at this variant's {speed:,.0f} tokens/s, {time_steps} steps of "
                f"{per_step} tokens; the row trained {row['equal_time'].get('steps')!r}")
    return _run_problem(row["equal_time"], f"{name!r} at equal time", config, changes,
                        row["equal_time"]["steps"], val_tokens)[0]


@_check(hints=(
    "Each variant is the base config with a few fields changed; train it twice with your own stack: once for the "
    "token budget, once for as many steps as its measured speed fits into the time budget. Invariant: every number "
    "in a row can be recomputed from the run dir the row names.",
    "The equal-tokens run takes the token budget divided by the tokens of one step (batch size times accumulation "
    "times block size) steps, its schedule and its one evaluation ending at the last of them. Its speed is the "
    "median tokens_per_s of its metrics rows after the first; the equal-time run takes as many steps as that speed "
    "fits into the seconds, rounded. Report my_train's final_val_loss, the loss over the whole val split."))
def ablation(fn: Callable, seed: int | None = None, log: bool = True) -> Result:
    """fn(variants, config, opt_args, data_dir, out_root, tokens, seconds, train_kw) -> one row per variant:
    {variant, changes, params, tokens_per_s, equal_tokens: {steps, val_loss, run}, equal_time: {steps, val_loss,
    run}}.

    The check hands fn a 1-layer GPT config, two variants (the base and a random switch) and a bigram-chain data
    dir, then loads every run dir a row names: written by the learner's my_train, with the variant's config, the
    row's steps, and the row's val loss equal to the saved model's over the whole val split; tokens_per_s equal to
    that run's logged median, and the equal-time run as long as that speed allows.
    """
    from minilm.data import TokenData

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    switch = SWITCHES[int(torch.randint(len(SWITCHES), (1,), generator=g))]
    variants = {"base": {}, ", ".join(f"{k}={v}" for k, v in switch.items()): dict(switch)}
    config = _model_config(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, pos="rope",
                           norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False)
    train_kw = dict(batch_size=8, grad_accum=1, lr=1e-2, min_lr=1e-3, warmup_iters=2, grad_clip=1.0, eval_iters=2,
                    log_interval=5, seed=s % 1000, device="cpu", dtype="float32")
    tokens, seconds, per_step = 20 * 8 * 16, 0.25, 8 * 16
    what = f"variants {list(variants)} of a 1-layer GPT, {tokens} tokens or {seconds} s each"
    called = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = _markov_data_dir(Path(tmp), s)
        try:
            with watching(WATCH_TRAIN, called, fn):
                rows = fn(variants, config, (1e-2, 0.02, 0.1, (0.9, 0.95), 0.95), data, Path(tmp) / "abl", tokens,
                          seconds, dict(train_kw))
        except Exception as e:
            return _finish("ablation", False, _crash(e, what), s, log)
        if not isinstance(rows, list) or len(rows) != len(variants):
            return _finish("ablation", False, f"{what}\n  expected a list of {len(variants)} rows, got {rows!r:.200}",
                           s, log)
        val = TokenData(data, "val").tokens
        for row, (name, changes) in zip(rows, variants.items()):
            problem = _row_problem(row, name, changes, config, per_step, tokens, seconds, val)
            if problem:
                return _finish("ablation", False, f"{what}\n  {problem}", s, log)
    table = "; ".join(f"{r['variant']}: {r['equal_tokens']['val_loss']:.3f} / {r['equal_time']['val_loss']:.3f}"
                      for r in rows)
    return _finish("ablation", True, f"{what}: every row read back from its run dirs (val loss at equal tokens / "
                   f"equal time: {table})", s, log, uses_reference=called)
