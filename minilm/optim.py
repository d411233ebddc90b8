"""The optimizers a run uses, chosen by TrainConfig.optimizer, and the learning-rate schedule they share.

    optimizers = build_optimizers(model, cfg.train, "cpu")   # [AdamW] or [Muon, AdamW]
    set_lr(optimizers, step, cfg.train)                      # every group: its own peak LR x the schedule

adamw: one AdamW; weight decay on matrices (embeddings, Linear weights), none on gains and biases.
muon:  torch.optim.Muon for the hidden matrices (the 2-D weights of the Linear layers inside the network: attention
       and MLP projections), AdamW for everything else (token/position embeddings, the output head, gains,
       biases). Muon orthogonalises each matrix's momentum (Newton-Schulz), so every direction of the update
       has the same size; that suits hidden matrices but not embeddings (rows are looked up, not multiplied) nor
       the head. Each group keeps its own peak LR ("peak_lr") and follows the same warmup/cosine shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minilm.config import ConfigError


def get_lr(it: int, t) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at lr_decay_iters (0: at max_iters)."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if it < t.warmup_iters:
        return t.lr * (it + 1) / (t.warmup_iters + 1)
    if it >= decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of Linear layers, except the output head and any weight shared with an embedding."""
    embedding = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    out, seen = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        w = mod.weight
        if w.requires_grad and w.dim() == 2 and id(w) not in embedding and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


def build_optimizers(model: nn.Module, t, device_type: str) -> list[torch.optim.Optimizer]:
    """The run's optimizers for `model` per t.optimizer; every param group carries its peak LR as "peak_lr"."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device_type == "cuda"
    if t.optimizer == "adamw":
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay, "peak_lr": t.lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "peak_lr": t.lr},
        ]
        return [torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)]
    if t.optimizer != "muon":
        raise ConfigError(f"optimizer={t.optimizer!r} must be 'adamw' or 'muon'")
    hidden = hidden_matrices(model)
    if not hidden:
        raise ConfigError("optimizer=muon found no hidden matrices (2-D Linear weights besides the head) in the "
                          "model; use --optimizer=adamw")
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    muon = torch.optim.Muon([{"params": hidden, "peak_lr": t.muon_lr}], lr=t.muon_lr, weight_decay=t.weight_decay,
                            momentum=t.muon_momentum, nesterov=True, adjust_lr_fn="original")
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay, "peak_lr": t.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": t.lr},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    return [muon, adamw]


def set_lr(optimizers: list[torch.optim.Optimizer], it: int, t) -> float:
    """Put every group on the schedule at step `it`: its peak LR times get_lr(it) / lr. Returns get_lr(it)."""
    lr = get_lr(it, t)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr / t.lr
    return lr


def optimizer_states(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    return [opt.state_dict() for opt in optimizers]


def load_optimizer_states(optimizers: list[torch.optim.Optimizer], states, optimizer_name: str) -> None:
    """Restore states saved by optimizer_states (or a single AdamW state dict from an older checkpoint)."""
    if isinstance(states, dict):  # checkpoints before optimizers became a list held one AdamW
        states = [states]
    kinds = [type(opt).__name__ for opt in optimizers]
    if not isinstance(states, list) or len(states) != len(optimizers):
        n = len(states) if isinstance(states, list) else 0
        raise ConfigError(f"the checkpoint holds {n} optimizer state(s) but --optimizer={optimizer_name} uses "
                          f"{len(optimizers)} ({', '.join(kinds)}); resume with the optimizer the run was started "
                          "with (see its config.yaml)")
    for opt, state in zip(optimizers, states):
        peaks = [group["peak_lr"] for group in opt.param_groups]  # this run's config sets the LRs, as before
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"the checkpoint's optimizer state does not fit {type(opt).__name__} ({e}); resume "
                              "with the optimizer and model the run was started with (see its config.yaml)") from None
        for group, peak in zip(opt.param_groups, peaks):
            group["peak_lr"] = peak
