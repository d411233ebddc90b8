"""Train a GPT on a data dir. One file, one loop, top to bottom.

    python -m minilm.train                                  # tiny on CPU, mini_lm on CUDA
    python -m minilm.train --preset=small --max_iters=2000 --dtype=bfloat16
    python -m minilm.train --config configs/tiny.yaml --resume
    torchrun --standalone --nproc_per_node=4 -m minilm.train --preset=mini_lm
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from minilm.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from minilm.config import ConfigError, ModelConfig, RunConfig, parse_args, validate
from minilm.data import DataError, TokenData, load_tokenizer, read_meta
from minilm.model import GPT
from minilm.sample import pick_device

log = logging.getLogger("minilm.train")


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says what to try."""


# ----------------------------------------------------------------------------- set-up helpers


def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


def resolve_dtype(requested: str, device: str, bf16_supported: bool | None = None) -> str:
    """The autocast dtype to use, or a ConfigError when the device cannot do the requested one."""
    kind = device.split(":")[0]
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if requested == "auto":
            return "bfloat16" if bf16 else "float16"
        if requested == "bfloat16" and not bf16:
            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
            raise ConfigError(f"{gpu} cannot do bfloat16 (it needs compute capability 8.0+, e.g. A100, L4, "
                              "RTX 30xx); use --dtype=float16 (with loss scaling) or --dtype=float32")
        return requested
    if requested == "auto":
        return "float32"  # CPU/MPS: bf16 speed varies by chip; fp32 is the safe default, bf16 on request
    # float16 on CPU works (autocast + GradScaler) but is slow on most CPUs; it is allowed so the loss-scaling
    # path can be run and tested without a GPU.
    return requested


def prepare_data(data_dir: Path, vocab_size: int, rank: int) -> None:
    """Build the built-in corpus data dir on first use; anything else must already exist."""
    if (data_dir / "meta.json").is_file():
        return
    if data_dir.name.startswith("builtin"):
        if rank == 0:
            try:
                from dataset_curation.pipeline import build
            except ImportError:
                raise DataError(f"{data_dir} does not exist and dataset_curation is not installed; "
                                "install the repo (`pip install -e .`) or point --data_dir at a data dir") from None
            print(f"data dir {data_dir} not found: building it from the built-in corpus (the Python standard "
                  f"library), vocab {vocab_size}. This happens once.", flush=True)
            build(recipe="builtin", out=data_dir, vocab_size=vocab_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    # read_meta raises a DataError that says how to build a data dir


def get_lr(it: int, t) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at lr_decay_iters."""
    if it < t.warmup_iters:
        return t.lr * (it + 1) / (t.warmup_iters + 1)
    if it >= t.lr_decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


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


# ----------------------------------------------------------------------------- the training run


def train(cfg: RunConfig, why: str = "") -> dict:
    """Run training to max_iters (or early stop / Ctrl-C); returns the final metrics."""
    rank, local_rank, world = setup_distributed()
    master = rank == 0
    m, t = cfg.model, cfg.train
    out_dir = Path(t.out_dir)
    validate(cfg, world_size=world)  # before anything is written
    setup_logging(out_dir, rank)
    if why:
        log.info(why)

    device = f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else pick_device(t.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dtype = resolve_dtype(t.dtype, device)
    device_type = device.split(":")[0]
    torch.manual_seed(t.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 range, tensor-core speed
        torch.backends.cudnn.allow_tf32 = True

    # Data first: a wrong data dir should fail before a model is built.
    data_dir = Path(t.data_dir)
    prepare_data(data_dir, m.vocab_size, rank)
    meta = read_meta(data_dir)
    ckpt = None
    if t.resume:
        ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location="cpu")
        cfg.model = m = ModelConfig(**ckpt["config"]["model"])  # the architecture is the checkpoint's
        log.info(f"resuming from {out_dir / 'ckpt.pt'} at step {ckpt['step']}")
    else:
        m.vocab_size = meta["vocab_size"]
    train_data = TokenData(data_dir, "train", m.vocab_size, m.block_size, seed=t.seed + rank)
    val_data = TokenData(data_dir, "val", m.vocab_size, m.block_size, seed=t.seed)

    model = GPT(m).to(device)
    optimizer = model.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = (torch.autocast(device_type=device_type, dtype=ptdtype) if dtype != "float32"
           else contextlib.nullcontext())
    ema = [p.detach().clone() for p in model.parameters()] if t.ema_decay > 0 else None
    step, best_val, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        evals_since_best = ckpt.get("extra", {}).get("evals_since_best", 0)
        if ema is not None and ckpt.get("ema") is not None:
            ema = [e.to(device) for e in ckpt["ema"]]
        set_rng_state(ckpt["rng"])
        data_states = ckpt["data"].get("ranks", [])
        if rank < len(data_states):
            train_data.load_state_dict(data_states[rank])
        del ckpt

    n_params = model.num_params()
    tokens_per_step = t.batch_size * m.block_size * t.grad_accum  # over all processes: grad_accum is global
    if master:
        log.info(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M), n_layer={m.n_layer} n_head={m.n_head} "
                 f"n_embd={m.n_embd} block_size={m.block_size} vocab_size={m.vocab_size}")
        log.info(f"data: {data_dir} ({len(train_data):,} train / {len(val_data):,} val tokens, {meta['dtype']})")
        log.info(f"device: {device}, dtype: {dtype}, processes: {world}, compile: {t.compile}; "
                 f"{tokens_per_step:,} tokens per optimizer step")
        atomic_write(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out_dir / "config.yaml")
        tok_src = data_dir / meta.get("tokenizer", "tokenizer.json")
        if tok_src.is_file():
            atomic_write(tok_src.read_bytes(), out_dir / "tokenizer.json")

    raw_model = model
    if t.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    micro_steps = t.grad_accum // world  # grad_accum counts micro-batches over all processes

    writer = None
    if master and t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    metrics_path = out_dir / "metrics.jsonl"
    if master and not t.resume and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log; --resume appends

    def record(row: dict) -> None:
        if not master:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, row["step"])

    def checkpoint(name: str) -> None:
        # The sampler position before the batch already drawn for the next step, so a resume redraws it.
        data_states = [batch_state]
        if world > 1:
            data_states = [None] * world
            torch.distributed.all_gather_object(data_states, batch_state)
        if master:
            save_checkpoint(out_dir / name, model=raw_model, optimizer=optimizer, scaler=scaler, step=step,
                            best_val_loss=best_val, config=cfg.to_dict(), data_state={"ranks": data_states},
                            meta=meta, ema=[e.cpu() for e in ema] if ema is not None else None,
                            extra={"evals_since_best": evals_since_best})

    def swap_ema() -> None:  # exchange live and EMA weights in place (call twice to undo)
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(raw_model.parameters(), ema):
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)

    tok = load_tokenizer(data_dir) if master and t.sample_tokens > 0 else None

    def sample_text() -> str:
        if tok is None:
            return ""
        ids = tok.encode(t.sample_prompt).ids or [meta.get("eot_id", 0)]
        idx = torch.tensor([ids[-m.block_size :]], device=device)
        with ctx:
            out = raw_model.generate(idx, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed,
                                     eos_id=meta.get("eot_id"))
        return tok.decode(out[0].tolist())

    def evaluate_now() -> dict:
        swap_ema()
        losses = estimate_loss(raw_model, {"train": train_data, "val": val_data}, cfg, device, ctx)
        text = sample_text()
        swap_ema()
        return {"train_loss": losses["train"], "val_loss": losses["val"], "val_ppl": math.exp(losses["val"]),
                "sample": text}

    profiler = None
    if t.profile and master:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        profiler = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                           on_trace_ready=tensorboard_trace_handler(str(out_dir / "profile")), record_shapes=True)
        profiler.start()

    progress = None
    if master and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.max_iters, initial=step, desc="train", unit="step", dynamic_ncols=True)

    batch_state = train_data.state_dict()
    x, y = train_data.get_batch(t.batch_size, m.block_size, device)
    bad_steps, last_eval, stopped_by = 0, {}, "max_iters"
    t_log, tokens_since_log = time.perf_counter(), 0
    peak_name = torch.cuda.get_device_name(device) if device_type == "cuda" else device_type.upper()
    try:
        while step < t.max_iters:
            lr = get_lr(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Forward/backward over micro-batches; gradients add up, so each loss is divided by their count.
            loss_sum = torch.zeros((), device=device)
            for micro in range(micro_steps):
                sync = micro == micro_steps - 1
                no_sync = model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
                with no_sync:
                    with ctx:
                        _, loss = model(x, y)
                        loss = loss / micro_steps
                    batch_state = train_data.state_dict()
                    x, y = train_data.get_batch(t.batch_size, m.block_size, device)  # overlaps the backward
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= world

            # A non-finite loss poisons the weights: skip the update, and stop if it keeps happening.
            if not torch.isfinite(loss_sum):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if dtype == "float16":
                    scaler.update()  # lets the scaler back off
                log.warning(f"step {step}: loss is {loss_sum.item()}, update skipped ({bad_steps} in a row)")
                if bad_steps >= t.max_bad_steps:
                    raise TrainingAborted(
                        f"loss was non-finite for {bad_steps} steps in a row at step {step}. Lower --lr "
                        f"(now {t.lr}), keep --grad_clip=1.0, or use --dtype=bfloat16/float32 instead of float16. "
                        f"The last good checkpoint is {out_dir / 'ckpt.pt'}.")
                continue
            bad_steps = 0
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in raw_model.parameters()], 1 - t.ema_decay)
            step += 1
            tokens_since_log += tokens_per_step
            if profiler is not None:
                profiler.step()
                if step >= 6:
                    profiler.stop()
                    log.info(f"profiler trace written to {out_dir / 'profile'} (open it in TensorBoard or Perfetto)")
                    profiler = None

            if step % t.log_interval == 0 or step == t.max_iters:
                loss_val = loss_sum.item()
                dt = time.perf_counter() - t_log
                tok_s = tokens_since_log / dt
                mfu, _ = raw_model.estimate_mfu(tok_s / world, peak_name, dtype)
                record({"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu})
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}",
                                         mfu=f"{mfu:.1%}" if mfu is not None else "n/a")
                t_log, tokens_since_log = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)

            if step % t.eval_interval == 0 or step == t.max_iters:
                last_eval = evaluate_now()
                record({"step": step, **{k: v for k, v in last_eval.items() if k != "sample"}})
                if writer is not None and last_eval["sample"]:
                    writer.add_text("sample", last_eval["sample"], step)
                msg = (f"step {step}: train loss {last_eval['train_loss']:.4f}, val loss {last_eval['val_loss']:.4f}, "
                       f"val perplexity {last_eval['val_ppl']:.2f}")
                log.info(msg)
                improved = last_eval["val_loss"] < best_val
                if improved:
                    best_val, evals_since_best = last_eval["val_loss"], 0
                else:
                    evals_since_best += 1
                checkpoint("ckpt.pt")
                if improved:
                    checkpoint("ckpt_best.pt")
                if t.early_stop_patience and evals_since_best >= t.early_stop_patience:
                    log.info(f"early stop: val loss has not improved for {evals_since_best} evals "
                             f"(best {best_val:.4f})")
                    stopped_by = "early_stop"
                    break
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        if progress is not None:
            progress.close()
        log.info(f"\ninterrupted at step {step}: saving {out_dir / 'ckpt.pt'} ...")
        checkpoint("ckpt.pt")
        log.info(f"saved. Continue with: python -m minilm.train --out_dir={out_dir} --resume "
                 "(plus the same options as this run)")
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if profiler is not None:
            profiler.stop()

    if master and metrics_path.exists():
        plot_curves(metrics_path, out_dir / "learning_curve.png")
    result = {"step": step, "best_val_loss": best_val, "stopped_by": stopped_by, "n_params": n_params,
              **last_eval}
    if master and last_eval:
        log.info(f"done at step {step}: val loss {last_eval['val_loss']:.4f}, val perplexity "
                 f"{last_eval['val_ppl']:.2f} (best val loss {best_val:.4f})")
        log.info(f"checkpoints: {out_dir / 'ckpt.pt'} (last), {out_dir / 'ckpt_best.pt'} (best); "
                 f"curve: {out_dir / 'learning_curve.png'}")
        if last_eval.get("sample"):
            log.info("sample:\n" + last_eval["sample"])
    if world > 1:
        # DDP's promise, checked: every rank ends with bit-identical weights.
        import hashlib

        digest = hashlib.sha256()
        for p in raw_model.parameters():
            digest.update(p.detach().cpu().numpy().tobytes())
        digests = [None] * world
        torch.distributed.all_gather_object(digests, digest.hexdigest())
        same = len(set(digests)) == 1
        result["ranks_identical"] = same
        log.info(f"weights on all {world} ranks identical: {same} (sha256 {digests[0][:16]})")
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, why = parse_args(argv)
        result = train(cfg, why)
    except (ConfigError, DataError, CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result["stopped_by"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
