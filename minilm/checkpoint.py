"""Checkpoints: everything needed to resume a run exactly, written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit; the message says what to do."""


def rng_state() -> dict:
    """This process's random streams. CUDA: the current device's only (each rank saves its own GPU's), so a
    checkpoint from 4 GPUs resumes on fewer."""
    state = {
        "python": _py_state_to_plain(random.getstate()),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_plain_to_py_state(state["python"]))
    np.random.set_state(_plain_to_np_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints saved every visible GPU's state
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, device)


# weights_only=True loads tensors and plain containers only, so RNG states are stored as lists and tensors.
def _py_state_to_plain(s):
    return [s[0], list(s[1]), s[2]]


def _plain_to_py_state(s):
    return (s[0], tuple(s[1]), s[2])


def _np_state_to_plain(s):
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), s[2], s[3], s[4]]


def _plain_to_np_state(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, then os.replace: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(data: bytes | str, path: str | Path) -> None:
    """Write a file via a temp file in the same directory and os.replace, so readers never see half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scaler=None, step: int = 0,
                    best_val_loss: float = float("inf"), config: dict | None = None, data_state: dict | None = None,
                    meta: dict | None = None, ema: dict | None = None, extra: dict | None = None,
                    model_state: dict | None = None, rng: list[dict] | None = None) -> None:
    """Write a checkpoint per the contract: model, optimizer, scaler, step, best val loss, config, RNG, data, meta.

    optimizer: an optimizer, or a list of optimizers / their state dicts (stored as a list). model_state replaces
    the model's own state dict (ckpt_best.pt stores the EMA weights that way). ema: {parameter name: tensor}.
    rng: every rank's RNG state (rank 0's is also "rng"); default this process's.
    """
    raw = getattr(model, "module", model)  # unwrap DDP
    raw = getattr(raw, "_orig_mod", raw)  # unwrap torch.compile
    if isinstance(optimizer, (list, tuple)):
        optimizer = [o if isinstance(o, dict) else o.state_dict() for o in optimizer]
    elif optimizer is not None:
        optimizer = optimizer.state_dict()
    rng = rng or [rng_state()]
    ckpt = {
        "model": raw.state_dict() if model_state is None else model_state,
        "optimizer": optimizer,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "best_val_loss": float(best_val_loss),
        "config": config or {},
        "rng": rng[0],
        "rng_ranks": rng,
        "data": data_state or {},
        "meta": meta or {},
        "ema": ema,
        "extra": extra or {},
    }
    atomic_save(ckpt, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict; a missing or corrupt file raises CheckpointError with what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first with `python -m minilm.train --out_dir "
                              f"{path.parent}` or pass the run directory that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                              "it may be truncated or from another program: delete it and resume from "
                              "ckpt_best.pt or retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a minilm checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """Rebuild the GPT a checkpoint holds, in eval mode; returns (model, checkpoint dict).

    The weights are the ones training scored: with EMA on, ckpt.pt's EMA weights (ema=False gives the live
    ones, which resume training); ckpt_best.pt stores the scored weights as its model already.
    """
    from minilm.config import ModelConfig
    from minilm.model import GPT

    ckpt = load_checkpoint(path, map_location=device)
    try:
        model = GPT(ModelConfig.from_dict(ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema") is not None:
            saved = ckpt["ema"]
            with torch.no_grad():
                for i, (name, p) in enumerate(model.named_parameters()):
                    # {name: tensor} today; a list in parameter order in older checkpoints
                    p.copy_(saved[name] if isinstance(saved, dict) else saved[i])
    except (KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{path}: the weights do not match the stored config ({str(e)[:300]})") from None
    return model.to(device).eval(), ckpt
