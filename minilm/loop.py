"""The training loop: one optimizer step over micro-batches, logging, evaluation and checkpoints, the stop signal.

run_loop(run, progress) advances a set-up run (minilm.run_setup.set_up) to max_iters, early stop or a stop signal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time

import numpy as np
import torch

from minilm.checkpoint import rng_state, save_checkpoint
from minilm.config import RunConfig
from minilm.optim import optimizer_states, set_lr
from minilm.run_setup import TrainProgress, TrainRun

log = logging.getLogger("minilm.train")


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says what to try."""


# ----------------------------------------------------------------------------- EMA of the weights


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


# ----------------------------------------------------------------------------- stopping on a signal


@contextlib.contextmanager
def stop_on_signal():
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


def stop_requested(stop: threading.Event, run: TrainRun, micro: int) -> bool:
    """Was a stop signal received? Checked before every micro-batch; under DDP once per step, by all ranks together."""
    if run.world == 1:
        return stop.is_set()
    if micro:
        return False  # a collective (and a GPU sync) per micro-batch would cost overlap; a step is short
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=run.device)  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# ----------------------------------------------------------------------------- evaluation, logs, checkpoints


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


def record(run: TrainRun, row: dict) -> None:
    """One line of metrics.jsonl (and TensorBoard scalars), on rank 0."""
    if not run.master:
        return
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if run.writer is not None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                run.writer.add_scalar(k, v, row["step"])


def checkpoint(run: TrainRun, progress: TrainProgress, name: str, data_state: dict, rng: dict,
               model_state: dict | None = None, weights: str = "live") -> None:
    """Save `name` in out_dir: every rank's sampler and RNG state (gathered), rank 0 writes."""
    data_states, rngs = [data_state], [rng]
    if run.world > 1:
        data_states, rngs = [None] * run.world, [None] * run.world
        torch.distributed.all_gather_object(data_states, data_state)
        torch.distributed.all_gather_object(rngs, rng)
    if run.master:
        ema = ema_by_name(run.raw_model, run.ema) if run.ema is not None and model_state is None else None
        save_checkpoint(run.out_dir / name, model=run.raw_model, model_state=model_state,
                        optimizer=optimizer_states(run.optimizers), scaler=run.scaler, step=progress.step,
                        best_val_loss=progress.best_val, config=run.cfg.to_dict(), data_state={"ranks": data_states},
                        meta=run.meta, ema=ema, rng=rngs,
                        extra={"evals_since_best": progress.evals_since_best, "weights": weights})


def sample_text(run: TrainRun) -> str:
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


def evaluate_now(run: TrainRun) -> dict:
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


def eval_and_checkpoint(run: TrainRun, progress: TrainProgress) -> bool:
    """Evaluate, log, save ckpt.pt (and ckpt_best.pt on improvement); True when early stopping says stop."""
    t = run.cfg.train
    scored = None  # ckpt_best.pt holds the weights that were scored: with EMA on, a copy of the EMA ones
    with ema_weights(run.raw_model, run.ema):
        progress.last_eval = evaluate_now(run)
        improved = progress.last_eval["val_loss"] < progress.best_val
        if improved and run.ema is not None:
            scored = snapshot(run.raw_model)
    if improved:
        progress.best_val, progress.evals_since_best = progress.last_eval["val_loss"], 0
    else:
        progress.evals_since_best += 1
    record(run, {"step": progress.step, **{k: v for k, v in progress.last_eval.items() if k != "sample"}})
    if run.writer is not None and progress.last_eval["sample"]:
        run.writer.add_text("sample", progress.last_eval["sample"], progress.step)
    last = progress.last_eval
    log.info(f"step {progress.step}: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}, "
             f"val perplexity {last['val_ppl']:.2f}" + (" (EMA weights)" if run.ema is not None else ""))
    checkpoint(run, progress, "ckpt.pt", progress.batch_state, rng_state())
    if improved:
        checkpoint(run, progress, "ckpt_best.pt", progress.batch_state, rng_state(), model_state=scored,
                   weights="ema" if run.ema is not None else "live")
    if t.early_stop_patience and progress.evals_since_best >= t.early_stop_patience:
        log.info(f"early stop: val loss has not improved for {progress.evals_since_best} evals "
                 f"(best {progress.best_val:.4f})")
        progress.stopped_by = "early_stop"
        return True
    return False


# ----------------------------------------------------------------------------- the step


def train_step(run: TrainRun, progress: TrainProgress, stop: threading.Event, x, y):
    """One optimizer step over grad_accum micro-batches; returns (loss, lr, next x, next y), loss None if stopped.

    A Ctrl-C seen before a micro-batch abandons the step: nothing is applied and the checkpoint stores the
    sampler and RNG state from the step's start, so the resumed step redraws all its micro-batches.
    """
    t = run.cfg.train
    lr = set_lr(run.optimizers, progress.step, t)
    start_data, start_rng = progress.batch_state, rng_state()
    micro_steps = t.grad_accum // run.world  # grad_accum counts micro-batches over all processes
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(micro_steps):
        if stop_requested(stop, run, micro):
            for opt in run.optimizers:
                opt.zero_grad(set_to_none=True)
            checkpoint(run, progress, "ckpt.pt", start_data, start_rng)
            return None, lr, x, y
        last = micro == micro_steps - 1
        # Gradients add up over micro-batches, so each loss is divided by their count; DDP syncs on the last.
        no_sync = run.model.no_sync() if run.world > 1 and not last else contextlib.nullcontext()
        with no_sync:
            with run.ctx:
                _, loss = run.model(x, y)
                loss = loss / micro_steps
            progress.batch_state = run.train_data.state_dict()
            x, y = run.train_data.get_batch(t.batch_size, run.cfg.model.block_size, run.device)  # overlaps backward
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if run.world > 1:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= run.world

    if not torch.isfinite(loss_sum):
        skip_bad_step(run, progress, loss_sum.item())
        return loss_sum.item(), lr, x, y
    progress.bad_steps = 0
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
    progress.step += 1
    return loss_sum.item(), lr, x, y


def skip_bad_step(run: TrainRun, progress: TrainProgress, loss: float) -> None:
    """A non-finite loss poisons the weights: drop the gradients, back off the loss scale, abort if it persists."""
    t = run.cfg.train
    progress.bad_steps += 1
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():
        # No optimizer step ran, so the scaler has no inf checks to back off from: set the smaller scale directly.
        run.scaler.update(new_scale=run.scaler.get_scale() * run.scaler.get_backoff_factor())
    log.warning(f"step {progress.step}: loss is {loss}, update skipped ({progress.bad_steps} in a row)")
    if progress.bad_steps >= t.max_bad_steps:
        raise TrainingAborted(
            f"loss was non-finite for {progress.bad_steps} steps in a row at step {progress.step}. Lower --lr "
            f"(now {t.lr}), keep --grad_clip=1.0, or use --dtype=bfloat16/float32 instead of float16. "
            f"The last good checkpoint is {run.out_dir / 'ckpt.pt'}.")


# ----------------------------------------------------------------------------- the loop


def start_profiler(run: TrainRun):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.startswith("cuda") else [])
    profiler = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(run.out_dir / "profile")), record_shapes=True)
    profiler.start()
    return profiler


def step_profiler(run: TrainRun, profiler, step: int):
    """Advance the profiler's schedule; once its active steps are recorded, stop it and return None."""
    if profiler is None:
        return None
    profiler.step()
    if step < 6:
        return profiler
    profiler.stop()
    log.info(f"profiler trace written to {run.out_dir / 'profile'} (TensorBoard or Perfetto)")
    return None


def log_step(run: TrainRun, step: int, loss: float, lr: float, tok_s: float, bar) -> None:
    """A metrics.jsonl row (loss, lr, throughput, MFU) and the progress bar's numbers."""
    peak_name, peak_dtype = run.plan.gpu_name, run.plan.mfu_dtype  # fp32 with TF32 on: the TF32 peak
    mfu = (run.raw_model.estimate_mfu(tok_s / run.world, peak_name, peak_dtype)[0]
           if hasattr(run.raw_model, "estimate_mfu") else None)
    record(run, {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu})
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}" if mfu is not None else "n/a")


def run_loop(run: TrainRun, progress: TrainProgress) -> None:
    """Optimizer steps to max_iters: a log row every log_interval, eval and checkpoints every eval_interval.

    Stops early on early stopping or a stop signal (progress.stopped_by says which).
    """
    t = run.cfg.train
    tokens_per_step = t.batch_size * run.cfg.model.block_size * t.grad_accum  # global: grad_accum counts all ranks
    profiler = start_profiler(run) if t.profile and run.master else None
    bar = None
    if run.master and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_iters, initial=progress.step, desc="train", unit="step", dynamic_ncols=True)
    progress.batch_state = run.train_data.state_dict()
    x, y = run.train_data.get_batch(t.batch_size, run.cfg.model.block_size, run.device)
    t_log, tokens_since_log = time.perf_counter(), 0
    with stop_on_signal() as stop:
        try:
            while progress.step < t.max_iters:
                loss, lr, x, y = train_step(run, progress, stop, x, y)
                if loss is None:
                    progress.stopped_by = "interrupted"
                    break
                if not math.isfinite(loss):
                    continue  # skipped; train_step aborts when it keeps happening
                tokens_since_log += tokens_per_step
                profiler = step_profiler(run, profiler, progress.step)
                if progress.step % t.log_interval == 0 or progress.step == t.max_iters:
                    log_step(run, progress.step, loss, lr, tokens_since_log / (time.perf_counter() - t_log), bar)
                    t_log, tokens_since_log = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                at_eval = progress.step % t.eval_interval == 0 or progress.step == t.max_iters
                if at_eval and eval_and_checkpoint(run, progress):
                    break
        finally:
            if bar is not None:
                bar.close()
            if run.writer is not None:
                run.writer.close()
            if profiler is not None:
                profiler.stop()
