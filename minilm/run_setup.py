"""The set-up of a training run: process group, device and dtype, data, model, optimizers, EMA, outputs.

set_up(cfg) returns the TrainRun (everything fixed for the run) and its TrainProgress (what the loop advances
and checkpoints store); with --resume both are restored from ckpt.pt by the rules in minilm.resume.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from minilm.checkpoint import atomic_write
from minilm.config import ModelConfig, RunConfig, TrainConfig, validate
from minilm.data import DataError, TokenData, load_tokenizer, read_meta
from minilm.device import DevicePlan, bf16_speedup, keep_freed_memory, plan_device, setup_distributed, use_device
from minilm.model import GPT
from minilm.optim import build_optimizers, watch_muon_cost
from minilm.resume import ema_from_checkpoint, kept_dtype, open_checkpoint, restore_streams, restore_weights

log = logging.getLogger("minilm.train")


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


def count_params(model: torch.nn.Module) -> int:
    return model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())


def log_token_budget(train_cfg: TrainConfig, block_size: int, n_params: int, train_tokens: int) -> None:
    """How much data the run will see: tokens, tokens per parameter (Chinchilla: ~20), epochs of the train split."""
    per_step = train_cfg.batch_size * block_size * train_cfg.grad_accum
    seen = per_step * train_cfg.max_iters
    log.info(f"token budget: {train_cfg.max_iters:,} steps x {per_step:,} tokens = {seen:,} tokens seen, "
             f"{seen / n_params:.1f} tokens per parameter, {seen / train_tokens:.2f} epochs of the training data")


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
    saved = kept_dtype(ckpt)
    if saved is not None:
        return saved, "kept from the checkpoint: the dtype the run started with (--dtype=... changes it)"
    dtype, why = flags_choice
    if rank == 0 and dtype == "bfloat16":
        dtype, why = probe_cpu_dtype(model, m, batch_size)
    if world > 1:  # every rank must run the same dtype: rank 0's decides
        box = [(dtype, why if rank == 0 else "")]
        torch.distributed.broadcast_object_list(box, src=0)
        dtype, why = box[0][0], f"rank 0's choice: {box[0][1]}"
    return dtype, why


def choose_dtype(cfg: RunConfig, plan: DevicePlan, model: torch.nn.Module, rank: int, world: int,
                 ckpt: dict | None) -> tuple[str, str]:
    """(dtype, why): the device plan's, or on a CPU with --dtype=auto cpu_autocast_dtype's; recorded in cfg so
    config.yaml and the checkpoint name the dtype the run uses."""
    dtype, why = plan.dtype, plan.dtype_why
    if cfg.train.dtype == "auto" and plan.device.split(":")[0] == "cpu":
        dtype, why = cpu_autocast_dtype(model, cfg.model, cfg.train.batch_size, rank, world, (dtype, why), ckpt)
    if ckpt is not None and ckpt["config"]["train"].get("dtype", dtype) not in ("auto", dtype):
        log.info(f"changed on resume: dtype: {ckpt['config']['train']['dtype']!r} -> {dtype!r} ({why})")
    cfg.train.dtype = dtype
    return dtype, why


def mixed_precision(dtype: str, device_type: str) -> tuple[torch.amp.GradScaler, object]:
    """The loss scaler (on for float16 only) and the autocast context (a no-op for float32)."""
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = torch.autocast(device_type=device_type, dtype=ptdtype) if dtype != "float32" else contextlib.nullcontext()
    return scaler, ctx


def optimizers_for(model: torch.nn.Module, cfg: RunConfig, plan: DevicePlan, rank: int) -> list:
    """build_optimizers, with rank 0 watching Muon's share of the step time (and naming GPUs where it is high)."""
    optimizers = build_optimizers(model, cfg.train, plan.device.split(":")[0])
    if rank == 0:
        slow = plan.capability is not None and plan.capability < (8, 0)
        watch_muon_cost(optimizers, plan.device, log.info, note=(
            f"; this GPU (sm_{plan.capability[0]}{plan.capability[1]}) runs bf16 without tensor cores: if the "
            "share is large, --optimizer=adamw avoids it") if slow else "")
    return optimizers


def start_ema(model: torch.nn.Module, decay: float, ckpt: dict | None, device: str) -> list | None:
    """The EMA of the weights (None when ema_decay is 0): the checkpoint's on --resume, else a copy of them."""
    if decay <= 0:
        return None
    if ckpt is not None and ckpt.get("ema") is not None:
        return ema_from_checkpoint(model, ckpt["ema"], device)
    return [p.detach().clone() for p in model.parameters()]


def announce(run: TrainRun, own_model: torch.nn.Module | None) -> None:
    """Rank 0: log what the run is, and write config.yaml, tokenizer.json and (a fresh run) an empty metrics log."""
    model_cfg, train_cfg, data_dir = run.cfg.model, run.cfg.train, Path(run.cfg.train.data_dir)
    n_params = count_params(run.raw_model)
    log.info(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M), n_layer={model_cfg.n_layer} "
             f"n_head={model_cfg.n_head} n_embd={model_cfg.n_embd} block_size={model_cfg.block_size} "
             f"vocab_size={model_cfg.vocab_size}"
             + ("" if own_model is None else f" ({type(own_model).__name__}, your model)"))
    log.info(f"data: {data_dir} ({len(run.train_data):,} train / {len(run.val_data):,} val tokens, "
             f"{run.meta['dtype']})")
    log.info(f"device: {run.device}, dtype: {run.dtype} ({run.dtype_why}), processes: {run.world}, "
             f"compile: {train_cfg.compile}, optimizer: {', '.join(type(o).__name__ for o in run.optimizers)}")
    log_token_budget(train_cfg, model_cfg.block_size, n_params, len(run.train_data))
    atomic_write(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False), run.out_dir / "config.yaml")
    tok_src = data_dir / run.meta.get("tokenizer", "tokenizer.json")
    if tok_src.is_file():
        atomic_write(tok_src.read_bytes(), run.out_dir / "tokenizer.json")
    if train_cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out_dir / "tensorboard"))
    if not train_cfg.resume and run.metrics_path.exists():
        run.metrics_path.unlink()  # a fresh run starts a fresh log; --resume appends


def set_up(cfg: RunConfig, why: str, model: torch.nn.Module | None) -> tuple[TrainRun, TrainProgress]:
    """Process group, device and dtype, data, model, optimizers; restored from ckpt.pt with --resume."""
    rank, local_rank, world = setup_distributed()
    model_cfg, train_cfg = cfg.model, cfg.train
    out_dir = Path(train_cfg.out_dir)
    validate(cfg, world_size=world)  # before anything is written
    setup_logging(out_dir, rank)
    if why:
        log.info(why)
    plan = plan_device(train_cfg.device, train_cfg.dtype, local_rank, world)  # "cuda" becomes "cuda:<local_rank>"
    use_device(plan)
    device, device_type = plan.device, plan.device.split(":")[0]
    if device_type == "cpu":
        keep_freed_memory()

    # Data first: a wrong data dir should fail before a model is built.
    data_dir = Path(train_cfg.data_dir)
    prepare_data(data_dir, model_cfg.vocab_size, rank)
    meta = read_meta(data_dir)
    ckpt = open_checkpoint(cfg, meta)  # minilm.resume.RESUME_SOURCE: what comes from the checkpoint
    train_data = TokenData(data_dir, "train", model_cfg.vocab_size, model_cfg.block_size, seed=train_cfg.seed + rank)
    val_data = TokenData(data_dir, "val", model_cfg.vocab_size, model_cfg.block_size, seed=train_cfg.seed)

    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    raw_model = (GPT(model_cfg) if model is None else model).to(device)
    torch.manual_seed(train_cfg.seed + rank)  # then each rank its own dropout masks
    dtype, dtype_why = choose_dtype(cfg, plan, raw_model, rank, world, ckpt)
    optimizers = optimizers_for(raw_model, cfg, plan, rank)
    scaler, ctx = mixed_precision(dtype, device_type)
    progress = TrainProgress()
    if ckpt is not None:
        restore_weights(ckpt, raw_model, optimizers, train_cfg.optimizer, scaler, progress)

    # Wrapping broadcasts rank 0's weights; the EMA is taken after it so every rank averages the same ones.
    wrapped = wrap_model(raw_model, train_cfg.compile, world, device)
    ema = start_ema(raw_model, train_cfg.ema_decay, ckpt, device)
    tokenizer = load_tokenizer(data_dir) if rank == 0 and train_cfg.sample_tokens > 0 else None
    run = TrainRun(cfg, rank, world, device, dtype, ctx, out_dir, meta, train_data, val_data, wrapped, raw_model,
                   optimizers, scaler, ema, tokenizer, plan=plan, dtype_why=dtype_why)
    if ckpt is not None:  # last, so nothing in the set-up moves the restored random streams
        restore_streams(ckpt, rank, train_data)
    if run.master:
        announce(run, model)
    return run, progress


@dataclass
class TrainRun:
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
    dtype_why: str = ""  # why this dtype, for the log

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"


@dataclass
class TrainProgress:
    """What changes as the run goes; checkpoints store it."""

    step: int = 0
    best_val: float = float("inf")
    evals_since_best: int = 0
    bad_steps: int = 0
    stopped_by: str = "max_iters"
    last_eval: dict = field(default_factory=dict)
    batch_state: dict = field(default_factory=dict)  # sampler position before the batch drawn for the next step
