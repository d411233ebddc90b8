"""Train a GPT on a data dir. One file, one loop, top to bottom.

    python -m minilm.train                                  # tiny on CPU, mini_lm on CUDA
    python -m minilm.train --preset=small --max_iters=2000 --dtype=bfloat16
    python -m minilm.train --config configs/tiny.yaml --resume
    torchrun --standalone --nproc_per_node=4 -m minilm.train --preset=mini_lm

train() reads in four phases: set-up (device, data, model, optimizers, resume), the step (micro-batches, skip a
non-finite loss, clip, update, EMA), evaluation and checkpoints, and the end (a final val loss over the whole
val split beside counting baselines). Each feature is a small function above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from minilm.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from minilm.config import ConfigError, ModelConfig, RunConfig, parse_args, validate
from minilm.data import DataError, TokenData, baseline_losses, load_tokenizer, read_meta, whole_split_loss
from minilm.device import (
    DevicePlan,
    bf16_speedup,
    keep_freed_memory,
    plan_device,
    resolve_dtype,
    setup_distributed,
    use_device,
)
from minilm.model import GPT
from minilm.optim import (
    build_optimizers,
    get_lr,
    load_optimizer_states,
    optimizer_states,
    set_lr,
    watch_muon_cost,
)

__all__ = ["TrainingAborted", "get_lr", "main", "resolve_dtype", "setup_distributed", "train"]

log = logging.getLogger("minilm.train")


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says what to try."""


# ----------------------------------------------------------------------------- set-up helpers


def prepare_data(data_dir: Path, vocab_size: int, rank: int) -> None:
    """Build a built-in corpus data dir on first use (builtin-*, installed-*); anything else must already exist."""
    if (data_dir / "meta.json").is_file():
        return
    recipes = {"builtin": "the Python standard library",
               "installed": "the standard library plus the licence-checked source of the installed packages"}
    recipe = next((r for r in recipes if data_dir.name.startswith(r)), None)
    if recipe is not None:
        if rank == 0:
            try:
                from dataset_curation.pipeline import build
            except ImportError:
                raise DataError(f"{data_dir} does not exist and dataset_curation is not installed; "
                                "install the repo (`pip install -e .`) or point --data_dir at a data dir") from None
            print(f"data dir {data_dir} not found: building it from {recipes[recipe]}, vocab {vocab_size}. "
                  "This happens once.", flush=True)
            build(recipe=recipe, out=data_dir, vocab_size=vocab_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    # read_meta raises a DataError that says how to build a data dir


class _TqdmHandler(logging.Handler):
    """Console output that goes around a live tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(out_dir: Path, rank: int) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(_TqdmHandler())
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)


# What --resume takes from ckpt.pt and what from this run's config (command line, YAML, preset).
#   "checkpoint": the saved value is used; asking for a different one is refused, naming the field (the weights, the
#                 optimizer state or the restored random streams depend on it).
#   "run":        this run's value is used; a change from the checkpoint is applied and logged.
#   "schedule":   the checkpoint's cosine end unless --lr_decay_iters is given (resolve_schedule).
#   "dtype":      --dtype=auto on a CPU keeps the dtype the run started with (no new probe); otherwise "run".
RESUME_SOURCE: dict[str, str] = {
    "model.vocab_size": "checkpoint",  # and the data dir's tokenizer must have the same size
    "model.block_size": "checkpoint",
    "model.n_layer": "checkpoint",
    "model.n_head": "checkpoint",
    "model.n_embd": "checkpoint",
    "model.pos": "checkpoint",
    "model.norm": "checkpoint",
    "model.mlp": "checkpoint",
    "model.mlp_hidden": "checkpoint",
    "model.qk_norm": "checkpoint",
    "model.tie_embeddings": "checkpoint",
    "model.bias": "checkpoint",
    "model.zero_init": "checkpoint",
    "model.rope_theta": "checkpoint",
    "model.dropout": "run",
    "model.grad_checkpoint": "run",
    "train.optimizer": "checkpoint",  # one saved state per optimizer
    "train.seed": "checkpoint",  # the restored random streams and the eval batches come from it
    "train.lr_decay_iters": "schedule",
    "train.dtype": "dtype",
    **{f"train.{k}": "run" for k in (
        "preset", "data_dir", "out_dir", "device", "compile", "batch_size", "grad_accum", "max_iters", "lr", "min_lr",
        "warmup_iters", "weight_decay", "beta1", "beta2", "grad_clip", "muon_lr", "muon_momentum", "eval_interval",
        "eval_iters", "log_interval", "sample_tokens", "sample_prompt", "resume", "early_stop_patience",
        "ema_decay", "profile", "max_bad_steps", "final_eval", "tensorboard", "progress")},
}


def resume_config(cfg: RunConfig, ckpt: dict, meta: dict) -> list[str]:
    """Apply RESUME_SOURCE to cfg in place; returns the changes applied, one line each, for the log.

    A field the command line (or --config file) did not set takes the checkpoint's value. One it set: a "checkpoint"
    field that differs is a ConfigError with the field and what to pass; a "run" field is changed and logged.
    Fields an older checkpoint lacks take the value it was trained with (ModelConfig's defaults for the model;
    this run's for training).
    """
    saved_model = dataclasses.asdict(ModelConfig.from_dict(ckpt["config"]["model"]))
    saved = {"model": saved_model, "train": ckpt["config"].get("train", {})}
    raw_model_keys = set(ckpt["config"]["model"])
    if meta["vocab_size"] != saved_model["vocab_size"]:
        raise ConfigError(f"vocab_size: the data dir {cfg.train.data_dir} has {meta['vocab_size']} tokens but the "
                          f"checkpoint's model has {saved_model['vocab_size']}; resume with the data dir the run "
                          "was trained on (train.data_dir in its config.yaml)")
    cfg.model.vocab_size = saved_model["vocab_size"]  # a fresh run takes it from the data dir, never the command line
    given = cfg.explicit
    changes = []
    for key, source in RESUME_SOURCE.items():
        section, name = key.split(".")
        if name not in saved[section] or source in ("schedule", "dtype") or name == "resume":
            continue
        old, new = saved[section][name], getattr(getattr(cfg, section), name)
        # where the run is and what it runs on are always this invocation's, given or not
        not_given = given is not None and name not in given and name not in ("out_dir", "data_dir", "device", "preset")
        if not_given or (source == "checkpoint" and section == "model" and name not in raw_model_keys):
            setattr(getattr(cfg, section), name, old)  # not asked to change: the run goes on as it was
        elif old == new:
            continue
        elif source == "checkpoint":
            raise ConfigError(f"--resume cannot change {name} (the checkpoint's weights, optimizer state or random "
                              f"streams depend on it): the checkpoint's run has {name}={old}, this run asks for "
                              f"--{name}={new}. Pass --{name}={old} or leave it out to continue the run, or start "
                              "a new run in another --out_dir")
        else:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def resolve_schedule(t, ckpt: dict | None) -> None:
    """Fix lr_decay_iters: the user's value, else on --resume the checkpoint's, else max_iters (logged)."""
    if t.lr_decay_iters:
        return
    if ckpt is not None:
        old = ckpt["config"].get("train", {})
        t.lr_decay_iters = old.get("lr_decay_iters") or old.get("max_iters") or t.max_iters
        if t.lr_decay_iters != t.max_iters:
            log.info(f"keeping the checkpoint's LR schedule: cosine decay ends at step {t.lr_decay_iters} "
                     f"(max_iters is now {t.max_iters}; pass --lr_decay_iters=N to change the schedule)")
    else:
        t.lr_decay_iters = t.max_iters


def count_params(model: torch.nn.Module) -> int:
    return model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())


def log_token_budget(t, block_size: int, n_params: int, train_tokens: int) -> None:
    """How much data the run will see: tokens, tokens per parameter (Chinchilla: ~20), epochs of the train split."""
    per_step = t.batch_size * block_size * t.grad_accum
    seen = per_step * t.max_iters
    log.info(f"token budget: {t.max_iters:,} steps x {per_step:,} tokens = {seen:,} tokens seen, "
             f"{seen / n_params:.1f} tokens per parameter, {seen / train_tokens:.2f} epochs of the training data")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict as it is now (tied weights stay one tensor)."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, v in model.state_dict().items():
        if v.data_ptr() not in copies:
            copies[v.data_ptr()] = v.detach().cpu().clone()
        out[name] = copies[v.data_ptr()]
    return out


def ema_by_name(model: torch.nn.Module, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: e.detach().cpu() for (name, _), e in zip(model.named_parameters(), ema)}


def ema_from_checkpoint(model: torch.nn.Module, saved, device: str) -> list[torch.Tensor]:
    """EMA tensors in parameter order, from a checkpoint's {name: tensor} (or an older run's plain list)."""
    if isinstance(saved, dict):
        return [saved[name].to(device) for name, _ in model.named_parameters()]
    return [e.to(device) for e in saved]


def update_ema(ema: list[torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema: list[torch.Tensor] | None):
    """Inside the block the model holds its EMA weights; the live ones come back after (swapped in place)."""
    def swap():
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    if ema is None:
        yield
        return
    swap()
    try:
        yield
    finally:
        swap()


@contextlib.contextmanager
def stop_on_ctrl_c():
    """A threading.Event set by Ctrl-C (SIGINT) or SIGTERM (what Slurm, Kubernetes and `kill` send before
    killing a job); the loop checks it between micro-batches and saves a checkpoint.

    The handler only sets the flag, so the stop always lands at a point where the state is consistent; a second
    signal acts at once (Ctrl-C: Python's usual KeyboardInterrupt; SIGTERM: exit). A signal whose handler is not
    Python's default (SIGINT ignored, as for a background job or nohup, or handled by someone else) is left
    alone, and nothing is installed outside the main thread.
    """
    stop = threading.Event()
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [sig for sig, default in defaults.items() if signal.getsignal(sig) is default]
    if threading.current_thread() is not threading.main_thread():
        ours = []

    def handler(signum, frame):
        stop.set()
        signal.signal(signum, defaults[signum])
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: stopping after this micro-batch and saving a checkpoint (again to quit at once)",
              file=sys.stderr, flush=True)

    for sig in ours:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig in ours:
            signal.signal(sig, defaults[sig])


def stop_requested(stop: threading.Event, run: Run, micro: int) -> bool:
    """Was Ctrl-C pressed? Checked before every micro-batch; under DDP once per step, by all ranks together."""
    if run.world == 1:
        return stop.is_set()
    if micro:
        return False  # a collective (and a GPU sync) per micro-batch would cost overlap; a step is short
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=run.device)  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def estimate_loss(model, datasets: dict, cfg: RunConfig, device: str, ctx) -> dict[str, float]:
    """Mean loss over eval_iters batches per split, drawn from a fixed RNG so evals are comparable."""
    model.eval()
    out = {}
    for split, data in datasets.items():
        rng = np.random.default_rng(cfg.train.seed + 1)  # own RNG: evaluating never moves the training stream
        losses = []
        for _ in range(cfg.train.eval_iters):
            x, y = data.get_batch(cfg.train.batch_size, cfg.model.block_size, device, rng=rng)
            with ctx:
                _, loss = model(x, y)
            losses.append(loss.item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss (per log step)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"Learning curve: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(buf.getvalue(), png_path)


# ----------------------------------------------------------------------------- what a run holds


@dataclass
class Run:
    """Everything set up once: config, process, device, data, model and its optimizers, outputs."""

    cfg: RunConfig
    rank: int
    world: int
    device: str
    dtype: str
    ctx: object  # autocast context (or a no-op for float32)
    out_dir: Path
    meta: dict
    train_data: TokenData
    val_data: TokenData
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    raw_model: torch.nn.Module  # the module itself: for eval, sampling, saving
    optimizers: list
    scaler: torch.amp.GradScaler
    ema: list | None = None
    tokenizer: object = None
    writer: object = None  # TensorBoard SummaryWriter
    plan: DevicePlan | None = None  # TF32, GPU name, MFU dtype (see minilm.device.plan_device)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"


@dataclass
class State:
    """What changes as the run goes; checkpoints store it."""

    step: int = 0
    best_val: float = float("inf")
    evals_since_best: int = 0
    bad_steps: int = 0
    stopped_by: str = "max_iters"
    last_eval: dict = field(default_factory=dict)
    batch_state: dict = field(default_factory=dict)  # sampler position before the batch drawn for the next step


def record(run: Run, row: dict) -> None:
    """One line of metrics.jsonl (and TensorBoard scalars), on rank 0."""
    if not run.master:
        return
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if run.writer is not None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                run.writer.add_scalar(k, v, row["step"])


def checkpoint(run: Run, st: State, name: str, data_state: dict, rng: dict, model_state: dict | None = None,
               weights: str = "live") -> None:
    """Save `name` in out_dir: every rank's sampler and RNG state (gathered), rank 0 writes."""
    data_states, rngs = [data_state], [rng]
    if run.world > 1:
        data_states, rngs = [None] * run.world, [None] * run.world
        torch.distributed.all_gather_object(data_states, data_state)
        torch.distributed.all_gather_object(rngs, rng)
    if run.master:
        ema = ema_by_name(run.raw_model, run.ema) if run.ema is not None and model_state is None else None
        save_checkpoint(run.out_dir / name, model=run.raw_model, model_state=model_state,
                        optimizer=optimizer_states(run.optimizers), scaler=run.scaler, step=st.step,
                        best_val_loss=st.best_val, config=run.cfg.to_dict(), data_state={"ranks": data_states},
                        meta=run.meta, ema=ema, rng=rngs,
                        extra={"evals_since_best": st.evals_since_best, "weights": weights})


def sample_text(run: Run) -> str:
    """A short sample from the prompt, on rank 0, when the model can generate."""
    t, m = run.cfg.train, run.cfg.model
    if run.tokenizer is None or not hasattr(run.raw_model, "generate"):
        return ""
    ids = run.tokenizer.encode(t.sample_prompt).ids or [run.meta.get("eot_id", 0)]
    idx = torch.tensor([ids[-m.block_size :]], device=run.device)
    with run.ctx:
        out = run.raw_model.generate(idx, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed,
                                     eos_id=run.meta.get("eot_id"))
    return run.tokenizer.decode(out[0].tolist())


def evaluate_now(run: Run) -> dict:
    """Train/val loss (and a sample) of the scored weights: the EMA when it is on, else the live ones.

    Under DDP every rank uses rank 0's numbers, so they agree on "improved" and early stop by construction.
    """
    losses = estimate_loss(run.raw_model, {"train": run.train_data, "val": run.val_data}, run.cfg, run.device,
                           run.ctx)
    text = sample_text(run)
    if run.world > 1:
        box = [losses]
        torch.distributed.broadcast_object_list(box, src=0)
        losses = box[0]
    return {"train_loss": losses["train"], "val_loss": losses["val"], "val_ppl": math.exp(losses["val"]),
            "sample": text}


def final_losses(run: Run) -> dict:
    """Val loss over the whole val split (non-overlapping block_size windows) beside count baselines (rank 0)."""
    t, m = run.cfg.train, run.cfg.model
    out = {"final_val_loss": whole_split_loss(run.raw_model, run.val_data.tokens, m.block_size, run.device,
                                              batch_size=t.batch_size, ctx=run.ctx)}
    base = baseline_losses(Path(t.data_dir), run.meta["vocab_size"])
    out["bigram_val_loss"], out["unigram_val_loss"] = base["bigram"]["val_loss"], base["unigram"]["val_loss"]
    return out


def weights_digest(run: Run) -> str:
    digest = hashlib.sha256()
    for p in list(run.raw_model.parameters()) + (run.ema or []):
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the step


def train_step(run: Run, st: State, stop: threading.Event, x, y):
    """One optimizer step over grad_accum micro-batches; returns (loss, lr, next x, next y), loss None if stopped.

    A Ctrl-C seen before a micro-batch abandons the step: nothing is applied and the checkpoint stores the
    sampler and RNG state from the step's start, so the resumed step redraws all its micro-batches.
    """
    t = run.cfg.train
    lr = set_lr(run.optimizers, st.step, t)
    start_data, start_rng = st.batch_state, rng_state()
    micro_steps = t.grad_accum // run.world  # grad_accum counts micro-batches over all processes
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(micro_steps):
        if stop_requested(stop, run, micro):
            for opt in run.optimizers:
                opt.zero_grad(set_to_none=True)
            checkpoint(run, st, "ckpt.pt", start_data, start_rng)
            return None, lr, x, y
        last = micro == micro_steps - 1
        # Gradients add up over micro-batches, so each loss is divided by their count; DDP syncs on the last.
        no_sync = run.model.no_sync() if run.world > 1 and not last else contextlib.nullcontext()
        with no_sync:
            with run.ctx:
                _, loss = run.model(x, y)
                loss = loss / micro_steps
            st.batch_state = run.train_data.state_dict()
            x, y = run.train_data.get_batch(t.batch_size, run.cfg.model.block_size, run.device)  # overlaps backward
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if run.world > 1:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= run.world

    if not torch.isfinite(loss_sum):
        skip_bad_step(run, st, loss_sum.item())
        return loss_sum.item(), lr, x, y
    st.bad_steps = 0
    norm = None
    if t.grad_clip > 0 or run.scaler.is_enabled():
        for opt in run.optimizers:
            run.scaler.unscale_(opt)  # the true gradients, for clipping and for one overflow check over all
        norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), t.grad_clip or float("inf"))
    if run.scaler.is_enabled() and not torch.isfinite(norm):
        run.scaler.update()  # float16 gradients overflowed: every optimizer skips; unscale_ saw it, so scale backs off
    else:
        for opt in run.optimizers:
            run.scaler.step(opt)
        run.scaler.update()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        update_ema(run.ema, run.raw_model, t.ema_decay)
    st.step += 1
    return loss_sum.item(), lr, x, y


def skip_bad_step(run: Run, st: State, loss: float) -> None:
    """A non-finite loss poisons the weights: drop the gradients, back off the loss scale, abort if it persists."""
    t = run.cfg.train
    st.bad_steps += 1
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():
        # No optimizer step ran, so the scaler has no inf checks to back off from: set the smaller scale directly.
        run.scaler.update(new_scale=run.scaler.get_scale() * run.scaler.get_backoff_factor())
    log.warning(f"step {st.step}: loss is {loss}, update skipped ({st.bad_steps} in a row)")
    if st.bad_steps >= t.max_bad_steps:
        raise TrainingAborted(
            f"loss was non-finite for {st.bad_steps} steps in a row at step {st.step}. Lower --lr "
            f"(now {t.lr}), keep --grad_clip=1.0, or use --dtype=bfloat16/float32 instead of float16. "
            f"The last good checkpoint is {run.out_dir / 'ckpt.pt'}.")


# ----------------------------------------------------------------------------- evaluation and checkpoints


def eval_and_checkpoint(run: Run, st: State) -> bool:
    """Evaluate, log, save ckpt.pt (and ckpt_best.pt on improvement); True when early stopping says stop."""
    t = run.cfg.train
    scored = None  # ckpt_best.pt holds the weights that were scored: with EMA on, a copy of the EMA ones
    with ema_weights(run.raw_model, run.ema):
        st.last_eval = evaluate_now(run)
        improved = st.last_eval["val_loss"] < st.best_val
        if improved and run.ema is not None:
            scored = snapshot(run.raw_model)
    if improved:
        st.best_val, st.evals_since_best = st.last_eval["val_loss"], 0
    else:
        st.evals_since_best += 1
    record(run, {"step": st.step, **{k: v for k, v in st.last_eval.items() if k != "sample"}})
    if run.writer is not None and st.last_eval["sample"]:
        run.writer.add_text("sample", st.last_eval["sample"], st.step)
    log.info(f"step {st.step}: train loss {st.last_eval['train_loss']:.4f}, val loss {st.last_eval['val_loss']:.4f}, "
             f"val perplexity {st.last_eval['val_ppl']:.2f}" + (" (EMA weights)" if run.ema is not None else ""))
    checkpoint(run, st, "ckpt.pt", st.batch_state, rng_state())
    if improved:
        checkpoint(run, st, "ckpt_best.pt", st.batch_state, rng_state(), model_state=scored,
                   weights="ema" if run.ema is not None else "live")
    if t.early_stop_patience and st.evals_since_best >= t.early_stop_patience:
        log.info(f"early stop: val loss has not improved for {st.evals_since_best} evals (best {st.best_val:.4f})")
        st.stopped_by = "early_stop"
        return True
    return False


# ----------------------------------------------------------------------------- the training run


def set_up(cfg: RunConfig, why: str, model: torch.nn.Module | None) -> tuple[Run, State]:
    """Process group, device and dtype, data, model, optimizers; restored from ckpt.pt with --resume."""
    rank, local_rank, world = setup_distributed()
    m, t = cfg.model, cfg.train
    out_dir = Path(t.out_dir)
    validate(cfg, world_size=world)  # before anything is written
    setup_logging(out_dir, rank)
    if why:
        log.info(why)
    plan = plan_device(t.device, t.dtype, local_rank, world)  # "cuda" becomes "cuda:<local_rank>"
    use_device(plan)
    device, dtype, dtype_why = plan.device, plan.dtype, plan.dtype_why
    device_type = device.split(":")[0]
    if device_type == "cpu":
        keep_freed_memory()

    # Data first: a wrong data dir should fail before a model is built.
    data_dir = Path(t.data_dir)
    prepare_data(data_dir, m.vocab_size, rank)
    meta = read_meta(data_dir)
    ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location="cpu") if t.resume else None
    if ckpt is not None:
        changes = resume_config(cfg, ckpt, meta)  # RESUME_SOURCE: what comes from the checkpoint, what from here
        log.info(f"resuming from {out_dir / 'ckpt.pt'} at step {ckpt['step']}"
                 + "".join(f"\n  changed on resume: {c}" for c in changes))
    else:
        m.vocab_size = meta["vocab_size"]
    resolve_schedule(t, ckpt)
    train_data = TokenData(data_dir, "train", m.vocab_size, m.block_size, seed=t.seed + rank)
    val_data = TokenData(data_dir, "val", m.vocab_size, m.block_size, seed=t.seed)

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    raw_model = (GPT(m) if model is None else model).to(device)
    torch.manual_seed(t.seed + rank)  # then each rank its own dropout masks
    if t.dtype == "auto" and device_type == "cpu":
        dtype, dtype_why = cpu_autocast_dtype(raw_model, m, t.batch_size, rank, world, (dtype, dtype_why), ckpt)
    if ckpt is not None and ckpt["config"]["train"].get("dtype", dtype) not in ("auto", dtype):
        log.info(f"changed on resume: dtype: {ckpt['config']['train']['dtype']!r} -> {dtype!r} ({dtype_why})")
    t.dtype = dtype  # config.yaml and the checkpoint record the dtype the run uses
    optimizers = build_optimizers(raw_model, t, device_type)
    if rank == 0:
        slow = plan.capability is not None and plan.capability < (8, 0)
        watch_muon_cost(optimizers, device, log.info, note=(
            f"; this GPU (sm_{plan.capability[0]}{plan.capability[1]}) runs bf16 without tensor cores: if the "
            "share is large, --optimizer=adamw avoids it") if slow else "")
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = torch.autocast(device_type=device_type, dtype=ptdtype) if dtype != "float32" else contextlib.nullcontext()
    st = State()
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        load_optimizer_states(optimizers, ckpt["optimizer"], t.optimizer)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        st.step, st.best_val = ckpt["step"], ckpt["best_val_loss"]
        st.evals_since_best = ckpt.get("extra", {}).get("evals_since_best", 0)

    # Wrapping broadcasts rank 0's weights; the EMA is taken after it so every rank averages the same ones.
    wrapped = wrap_model(raw_model, t.compile, world, device)
    ema = None
    if t.ema_decay > 0:
        ema = [p.detach().clone() for p in raw_model.parameters()]
        if ckpt is not None and ckpt.get("ema") is not None:
            ema = ema_from_checkpoint(raw_model, ckpt["ema"], device)
    tok = load_tokenizer(data_dir) if rank == 0 and t.sample_tokens > 0 else None
    run = Run(cfg, rank, world, device, dtype, ctx, out_dir, meta, train_data, val_data, wrapped, raw_model,
              optimizers, scaler, ema, tok, plan=plan)

    if ckpt is not None:  # last, so nothing in the set-up moves the restored random streams
        rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
        set_rng_state(rngs[rank] if rank < len(rngs) else ckpt["rng"])
        data_states = ckpt["data"].get("ranks", [])
        if rank < len(data_states):
            train_data.load_state_dict(data_states[rank])
    if run.master:
        n_params = count_params(raw_model)
        log.info(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M), n_layer={m.n_layer} n_head={m.n_head} "
                 f"n_embd={m.n_embd} block_size={m.block_size} vocab_size={m.vocab_size}"
                 + ("" if model is None else f" ({type(model).__name__}, your model)"))
        log.info(f"data: {data_dir} ({len(train_data):,} train / {len(val_data):,} val tokens, {meta['dtype']})")
        log.info(f"device: {device}, dtype: {dtype} ({dtype_why}), processes: {world}, compile: {t.compile}, "
                 f"optimizer: {', '.join(type(o).__name__ for o in optimizers)}")
        log_token_budget(t, m.block_size, n_params, len(train_data))
        atomic_write(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out_dir / "config.yaml")
        tok_src = data_dir / meta.get("tokenizer", "tokenizer.json")
        if tok_src.is_file():
            atomic_write(tok_src.read_bytes(), out_dir / "tokenizer.json")
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(out_dir / "tensorboard"))
        if not t.resume and run.metrics_path.exists():
            run.metrics_path.unlink()  # a fresh run starts a fresh log; --resume appends
    return run, st


def wrap_model(raw_model: torch.nn.Module, compile: bool, world: int, device: str) -> torch.nn.Module:
    """What the step calls: DDP around the model under torchrun, then torch.compile around that.

    This order is PyTorch's documented one: compiling the DDP module lets the compiler split the graph at DDP's
    bucket boundaries, so gradient all-reduce overlaps the backward pass (DDP(compile(m)) cannot overlap).
    """
    wrapped = raw_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        index = torch.device(device).index
        wrapped = DistributedDataParallel(raw_model, device_ids=[index] if device.startswith("cuda") else None)
    return torch.compile(wrapped) if compile else wrapped


def probe_cpu_dtype(model: torch.nn.Module, m: ModelConfig, batch_size: int) -> tuple[str, str]:
    """On a CPU with native bf16: bf16 only if a short probe of this model finds it >= 10% faster than fp32."""
    fp32, bf16 = bf16_speedup(model, m.vocab_size, m.block_size, batch_size)
    choice = "bfloat16" if bf16 >= 1.1 * fp32 else "float32"
    return choice, (f"native bf16 on this CPU; a probe of this model ran fp32 at {fp32:,.0f} and bf16 at "
                    f"{bf16:,.0f} tokens/s, so {choice}")


def cpu_autocast_dtype(model: torch.nn.Module, m: ModelConfig, batch_size: int, rank: int, world: int,
                       flags_choice: tuple[str, str], ckpt: dict | None) -> tuple[str, str]:
    """--dtype=auto on CPUs: (dtype, why). A resumed run keeps the dtype it started with (no new probe);
    a new one takes rank 0's choice (probed when its flags show native bf16), sent to every rank.

    flags_choice is resolve_dtype's answer from this machine's CPU flags. Every rank joins the broadcast, whatever
    its own flags say, so machines that differ cannot deadlock.
    """
    saved = ckpt["config"]["train"].get("dtype") if ckpt is not None else None
    if saved in ("float32", "bfloat16", "float16"):
        return saved, "kept from the checkpoint: the dtype the run started with (--dtype=... changes it)"
    dtype, why = flags_choice
    if rank == 0 and dtype == "bfloat16":
        dtype, why = probe_cpu_dtype(model, m, batch_size)
    if world > 1:  # every rank must run the same dtype: rank 0's decides
        box = [(dtype, why if rank == 0 else "")]
        torch.distributed.broadcast_object_list(box, src=0)
        dtype, why = box[0][0], f"rank 0's choice: {box[0][1]}"
    return dtype, why


def start_profiler(run: Run):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.startswith("cuda") else [])
    profiler = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(run.out_dir / "profile")), record_shapes=True)
    profiler.start()
    return profiler


def train(cfg: RunConfig, why: str = "", model: torch.nn.Module | None = None) -> dict:
    """Run training to max_iters (or early stop / Ctrl-C); returns the final metrics.

    model: your own nn.Module instead of GPT(cfg.model), with forward(idx, targets) -> (logits, loss);
    it is sampled from at evals only if it has .generate.
    """
    # ---- set-up
    run, st = set_up(cfg, why, model)
    t = cfg.train
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum  # global: grad_accum counts all ranks
    peak_name, peak_dtype = run.plan.gpu_name, run.plan.mfu_dtype  # fp32 with TF32 on: the TF32 peak
    profiler = start_profiler(run) if t.profile and run.master else None
    progress = None
    if run.master and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.max_iters, initial=st.step, desc="train", unit="step", dynamic_ncols=True)
    st.batch_state = run.train_data.state_dict()
    x, y = run.train_data.get_batch(t.batch_size, cfg.model.block_size, run.device)
    t_log, tokens_since_log = time.perf_counter(), 0

    # ---- the loop: one optimizer step, then logging, then (sometimes) eval and checkpoints
    with stop_on_ctrl_c() as stop:
        try:
            while st.step < t.max_iters:
                loss, lr, x, y = train_step(run, st, stop, x, y)
                if loss is None:
                    st.stopped_by = "interrupted"
                    break
                if not math.isfinite(loss):
                    continue  # skipped; train_step aborts when it keeps happening
                tokens_since_log += tokens_per_step
                if profiler is not None:
                    profiler.step()
                    if st.step >= 6:
                        profiler.stop()
                        log.info(f"profiler trace written to {run.out_dir / 'profile'} (TensorBoard or Perfetto)")
                        profiler = None
                if st.step % t.log_interval == 0 or st.step == t.max_iters:
                    tok_s = tokens_since_log / (time.perf_counter() - t_log)
                    mfu = (run.raw_model.estimate_mfu(tok_s / run.world, peak_name, peak_dtype)[0]
                           if hasattr(run.raw_model, "estimate_mfu") else None)
                    record(run, {"step": st.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu})
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}",
                                             mfu=f"{mfu:.1%}" if mfu is not None else "n/a")
                    t_log, tokens_since_log = time.perf_counter(), 0
                if progress is not None:
                    progress.update(1)
                if st.step % t.eval_interval == 0 or st.step == t.max_iters:
                    if eval_and_checkpoint(run, st):
                        break
        finally:
            if progress is not None:
                progress.close()
            if run.writer is not None:
                run.writer.close()
            if profiler is not None:
                profiler.stop()

    # ---- the end
    if st.stopped_by == "interrupted":
        log.info(f"interrupted at step {st.step}: saved {run.out_dir / 'ckpt.pt'}. Continue with: python -m "
                 f"minilm.train --out_dir={run.out_dir} --resume (plus the same options as this run)")
    result = {"step": st.step, "best_val_loss": st.best_val, "stopped_by": st.stopped_by,
              "n_params": count_params(run.raw_model), **st.last_eval}
    if run.master and st.stopped_by != "interrupted" and t.final_eval:
        t0 = time.perf_counter()
        with ema_weights(run.raw_model, run.ema):
            result.update(final_losses(run))
        record(run, {"step": st.step, **{k: result[k] for k in ("final_val_loss", "bigram_val_loss",
                                                                "unigram_val_loss")}})
        log.info(f"final: val loss {result['final_val_loss']:.3f} | bigram {result['bigram_val_loss']:.3f} | "
                 f"unigram {result['unigram_val_loss']:.3f} (nats/token over all {len(run.val_data):,} val tokens; "
                 f"{time.perf_counter() - t0:.1f} s)")
    if run.master and run.metrics_path.exists():
        plot_curves(run.metrics_path, run.out_dir / "learning_curve.png")
    if run.master and st.last_eval:
        log.info(f"done at step {st.step}: val loss {st.last_eval['val_loss']:.4f}, val perplexity "
                 f"{st.last_eval['val_ppl']:.2f} (best val loss {st.best_val:.4f})")
        log.info(f"checkpoints: {run.out_dir / 'ckpt.pt'} (last), {run.out_dir / 'ckpt_best.pt'} (best); "
                 f"curve: {run.out_dir / 'learning_curve.png'}")
        if st.last_eval.get("sample"):
            log.info("sample:\n" + st.last_eval["sample"])
    if run.world > 1:
        # DDP's promise, checked: every rank ends with bit-identical weights (and EMA weights).
        digests = [None] * run.world
        torch.distributed.all_gather_object(digests, weights_digest(run))
        result["ranks_identical"] = len(set(digests)) == 1
        log.info(f"weights on all {run.world} ranks identical: {result['ranks_identical']} "
                 f"(sha256 {digests[0][:16]})")
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, why = parse_args(argv)
        result = train(cfg, why)
    except (ConfigError, DataError, CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, nothing saved since the last checkpoint
        print("\ninterrupted twice: stopped without saving", file=sys.stderr)
        return 130
    return 130 if result["stopped_by"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
