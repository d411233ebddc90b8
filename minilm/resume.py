"""--resume: what a resumed run takes from ckpt.pt and what from this invocation's config, and restoring it.

RESUME_SOURCE is the rule table; resume_config applies it to the config, resolve_schedule and kept_dtype are its
two special cases, and restore_weights / restore_streams put the saved state back once the run is set up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from minilm.checkpoint import load_checkpoint, set_rng_state
from minilm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from minilm.optim import load_optimizer_states

log = logging.getLogger("minilm.train")

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


def resolve_schedule(train_cfg: TrainConfig, ckpt: dict | None) -> None:
    """Fix lr_decay_iters: the user's value, else on --resume the checkpoint's, else max_iters (logged)."""
    if train_cfg.lr_decay_iters:
        return
    if ckpt is not None:
        old = ckpt["config"].get("train", {})
        train_cfg.lr_decay_iters = old.get("lr_decay_iters") or old.get("max_iters") or train_cfg.max_iters
        if train_cfg.lr_decay_iters != train_cfg.max_iters:
            log.info(f"keeping the checkpoint's LR schedule: cosine decay ends at step {train_cfg.lr_decay_iters} "
                     f"(max_iters is now {train_cfg.max_iters}; pass --lr_decay_iters=N to change the schedule)")
    else:
        train_cfg.lr_decay_iters = train_cfg.max_iters


def open_checkpoint(cfg: RunConfig, meta: dict) -> dict | None:
    """With --resume: ckpt.pt, with cfg brought in line with it (resume_config, logged); else None, and the
    model's vocab_size from the data dir. Either way lr_decay_iters is fixed (resolve_schedule)."""
    out_dir = Path(cfg.train.out_dir)
    ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location="cpu") if cfg.train.resume else None
    if ckpt is not None:
        changes = resume_config(cfg, ckpt, meta)
        log.info(f"resuming from {out_dir / 'ckpt.pt'} at step {ckpt['step']}"
                 + "".join(f"\n  changed on resume: {c}" for c in changes))
    else:
        cfg.model.vocab_size = meta["vocab_size"]
    resolve_schedule(cfg.train, ckpt)
    return ckpt


def kept_dtype(ckpt: dict | None) -> str | None:
    """The dtype a resumed run started with, which --dtype=auto keeps (None for a new run or an old checkpoint)."""
    saved = ckpt["config"]["train"].get("dtype") if ckpt is not None else None
    return saved if saved in ("float32", "bfloat16", "float16") else None


def ema_from_checkpoint(model: torch.nn.Module, saved, device: str) -> list[torch.Tensor]:
    """EMA tensors in parameter order, from a checkpoint's {name: tensor} (or an older run's plain list)."""
    if isinstance(saved, dict):
        return [saved[name].to(device) for name, _ in model.named_parameters()]
    return [e.to(device) for e in saved]


def restore_weights(ckpt: dict, model: torch.nn.Module, optimizers: list, optimizer: str, scaler,
                    progress) -> None:
    """The model's, the optimizers' (`optimizer` as in TrainConfig) and the loss scaler's state, and the run's
    progress (a TrainProgress), from ckpt."""
    model.load_state_dict(ckpt["model"])
    load_optimizer_states(optimizers, ckpt["optimizer"], optimizer)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    progress.step, progress.best_val = ckpt["step"], ckpt["best_val_loss"]
    progress.evals_since_best = ckpt.get("extra", {}).get("evals_since_best", 0)


def restore_streams(ckpt: dict, rank: int, train_data) -> None:
    """This rank's random streams and data sampler position; called last in the set-up, so nothing after it moves
    them."""
    rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
    set_rng_state(rngs[rank] if rank < len(rngs) else ckpt["rng"])
    data_states = ckpt["data"].get("ranks", [])
    if rank < len(data_states):
        train_data.load_state_dict(data_states[rank])
