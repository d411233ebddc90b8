"""Task 4 of `python -m course status`: the learner's own run, judged by what its checkpoint does.

The run dir must hold a checkpoint written by the learner's loop (extra["trainer"] == "learner", their model and
optimizer classes) that loads into minilm's GPT. Status then scores the model on the whole validation split itself
(non-overlapping block_size windows: training's final val loss, evaluate's non-overlapping perplexity) and counts
an add-k bigram on the same tokens. eval.json, when present, must report the loss the model really has.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

LEARNER = "learner"
PACKAGE_PREFIXES = ("minilm.", "torch.")  # a class from here is the package's or torch's work, not the learner's
RUN_FILES = ("ckpt.pt", "config.yaml", "metrics.jsonl")
WINDOWS_PER_CHUNK = 64  # windows scored per perplexity() call; the progress bar moves once per chunk
EVAL_TOLERANCE = 2e-3  # nats, relative to max(1, loss): device and batching differences stay far below it


def how_to_train(out_dir: Path) -> str:
    return (f"train your GPT with your own loop (`my_train` in notebook week18/05_training, which writes ckpt.pt, "
            f"config.yaml and metrics.jsonl) into {out_dir}, or pass --out_dir to the run dir it wrote")


def provenance_problem(ckpt: dict, path: Path) -> str | None:
    """Why this checkpoint is not the learner's own run (None when it is): trainer, model and optimizer classes."""
    extra = ckpt.get("extra") or {}
    if extra.get("trainer") != LEARNER:
        return (f"{path} is the package's run (written by `python -m minilm.train`: the GPU project's reference), "
                f"not your own loop; it does not count for task 4: {how_to_train(path.parent)}")
    model_class = str(extra.get("model_class") or "")
    optimizers = [o.strip() for o in str(extra.get("optimizer_class") or "").split(",") if o.strip()]
    if "." not in model_class or not optimizers:
        return (f"{path}: extra records no model_class / optimizer_class (\"<module>.<class>\"), so the run cannot "
                f"be told apart from the package's; save it with your loop's checkpoint step as the contract says")
    if model_class.startswith(PACKAGE_PREFIXES):
        return (f"{path} was trained with {model_class}, the package's model, not yours: train your own GPT "
                "(notebook week18/04) with your loop")
    theirs = [o for o in optimizers if o.startswith(PACKAGE_PREFIXES)]
    if theirs:
        return (f"{path} was trained with {', '.join(theirs)}, not your own optimizer: train with your MyAdamW "
                "(and MyMuon) from notebook week17/03")
    return None


def load_model(path: Path, device: str):
    """(model, ckpt, None) or (None, ckpt-or-None, what is wrong with the file and what to do)."""
    from minilm.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    try:
        model, ckpt = model_from_checkpoint(path, device)
        return model, ckpt, None
    except CheckpointError as e:
        why = str(e)
    except Exception as e:  # a config that builds no GPT (ConfigError, TypeError from a malformed dict)
        why = f"{path}: its config does not build minilm's GPT ({type(e).__name__}: {str(e)[:200]})"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return None, None, why
    if not ckpt.get("model"):
        why = f"{path} holds no weights (its 'model' entry is empty)"
    return None, ckpt, (f"{why}; the checkpoint must hold your model's state_dict under minilm's parameter names "
                        f"(the check.gpt contract): save it again from your loop, then rerun status")


def run_data_dir(ckpt: dict, fallback: Path) -> Path:
    """The data dir the run recorded (config.train.data_dir) when it exists here, else status's --data_dir."""
    from course.status import resolve

    recorded = (ckpt.get("config") or {}).get("train", {}).get("data_dir")
    if recorded and resolve(recorded).is_dir():
        return resolve(recorded)
    return fallback


@torch.no_grad()
def window_loss(model, ids: np.ndarray, window: int, device: str, progress: bool = True) -> tuple[float, int]:
    """(mean NLL, scored tokens) of ids[1:] in non-overlapping windows, as metrics.perplexity with stride = window.

    The stream is fed in slices overlapping by one token, which keeps every window where one perplexity() call
    over the whole stream would put it, so the bar can move while the sums stay the same.
    """
    from tqdm import tqdm

    from metrics.perplexity import perplexity

    step = window * WINDOWS_PER_CHUNK
    starts = range(0, len(ids) - 1, step)
    fn = lambda x: model(x)[0]
    nll_sum, tokens = 0.0, 0
    bar = tqdm(starts, desc="status: validation loss", unit="chunk", delay=3, disable=not progress, leave=False)
    for s in bar:
        r = perplexity(fn, ids[s : s + step + 1], window, window, batch_size=16, device=device)
        nll_sum, tokens = nll_sum + r.nll_sum, tokens + r.tokens
    return nll_sum / tokens, tokens


def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Add-k bigram (k fitted on held-out training text) counted on the train split, scored on val[1:]."""
    from metrics.baselines import bigram_perplexity, fit_add_k

    k = fit_add_k(train, vocab_size, 2)
    return bigram_perplexity(train, val, vocab_size, k=k).nll


def eval_json_problem(out_dir: Path, model, ckpt: dict, val: np.ndarray, whole: float, device: str,
                      progress: bool) -> str | None:
    """Why eval.json does not describe this checkpoint (None when it agrees); assumes the file exists."""
    path = out_dir / "eval.json"
    redo = f"re-run `python -m minilm.evaluate --out_dir {out_dir}`"
    try:
        r = json.loads(path.read_text())
        p = r["perplexity"]
        claimed, tokens, window = float(p["non_overlapping"]["nll"]), int(p["tokens"]), int(p["window"])
        step = r["run"]["step"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return f"{path} is not minilm.evaluate's output ({type(e).__name__}: {e}); {redo}"
    if step != ckpt.get("step"):
        return f"{path} is of step {step} but ckpt.pt is at step {ckpt.get('step')}: it is stale; {redo}"
    if not 1 <= tokens <= len(val) - 1 or not 1 <= window <= model.config.block_size:
        return f"{path} claims {tokens:,} tokens in windows of {window}, which this run's val split cannot be; {redo}"
    if tokens == len(val) - 1 and window == model.config.block_size:
        real = whole
    else:  # evaluated with --max_tokens: the same first tokens, scored again
        real, _ = window_loss(model, val[: tokens + 1], window, device, progress)
    if not (math.isfinite(claimed) and abs(claimed - real) <= EVAL_TOLERANCE * max(1.0, abs(real))):
        return (f"{path} says validation loss {claimed:.4f} but the model in ckpt.pt scores {real:.4f} on the same "
                f"{tokens:,} tokens: eval.json was hand-edited or is stale; {redo}")
    return None


def run_state(out_dir: Path, data_dir: Path, device: str = "cpu", progress: bool = True) -> dict:
    """Task 4's verdict: {"ok", "detail", "eval_ok", "eval_detail"}; eval_* judge eval.json (task 5 uses them)."""
    from minilm.data import DataError, TokenData

    out = {"ok": False, "eval_ok": False, "eval_detail": f"no checkpoint in {out_dir} to check eval.json against"}
    missing = [f for f in RUN_FILES if not (out_dir / f).is_file()]
    if missing:
        return {**out, "detail": f"{out_dir} lacks {', '.join(missing)}: {how_to_train(out_dir)}"}
    model, ckpt, problem = load_model(out_dir / "ckpt.pt", device)
    if problem:
        return {**out, "detail": problem}
    out["eval_detail"] = f"eval.json was not checked against {out_dir / 'ckpt.pt'}: fix what task 4 says first"
    not_yours = provenance_problem(ckpt, out_dir / "ckpt.pt")
    has_eval = (out_dir / "eval.json").is_file()
    if not_yours and not has_eval:
        return {**out, "detail": not_yours}
    data_dir = run_data_dir(ckpt, data_dir)
    try:
        val_data = TokenData(data_dir, "val")
        val = np.asarray(val_data.tokens, dtype=np.int64)
        train = np.asarray(TokenData(data_dir, "train").tokens, dtype=np.int64)
    except DataError as e:
        return {**out, "detail": f"the run's data dir: {e}"}
    vocab, saved = int(val_data.meta["vocab_size"]), (ckpt.get("meta") or {}).get("tokens")
    if vocab > model.config.vocab_size or (saved and saved != val_data.meta.get("tokens")):
        return {**out, "detail": f"{out_dir} was not trained on {data_dir} (its vocabulary or token counts differ "
                                 "from the checkpoint's meta): pass --data_dir with the run's data dir"}
    if len(val) < 2 or len(train) < 20:
        return {**out, "detail": f"{data_dir} has too few tokens to score ({len(val)} val, {len(train)} train)"}
    loss, tokens = window_loss(model, val, model.config.block_size, device, progress)
    out["eval_detail"] = f"no {out_dir / 'eval.json'}: run `python -m minilm.evaluate --out_dir {out_dir}`"
    if has_eval:
        bad = eval_json_problem(out_dir, model, ckpt, val, loss, device, progress)
        out["eval_ok"], out["eval_detail"] = bad is None, bad or "eval.json agrees with the checkpoint"
    if not_yours:
        return {**out, "detail": not_yours}
    if progress and len(train) > 20_000_000:  # np.unique over the pairs: tens of seconds at 100M tokens
        print(f"status: counting the bigram baseline over {len(train):,} training tokens", file=sys.stderr)
    bigram = bigram_loss(train, val, vocab)
    step, extra = int(ckpt.get("step") or 0), ckpt["extra"]
    said = (f"{out_dir}: your run ({extra['model_class']}, {extra['optimizer_class']}), step {step:,}; validation "
            f"loss {loss:.4f} over all {tokens:,} val tokens of {data_dir}, recomputed from ckpt.pt")
    if not (math.isfinite(loss) and loss < bigram):
        return {**out, "detail": f"{said}, is not below the bigram baseline's {bigram:.4f} on the same tokens: "
                                 "train longer or larger"}
    return {**out, "ok": True, "detail": f"{said}, below the bigram baseline's {bigram:.4f} on the same tokens"}
