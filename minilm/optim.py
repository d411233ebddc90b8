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
import time
from collections.abc import Callable

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


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of torch.optim.Muon, in `dtype` (torch's always uses bf16)."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # never scale the momentum buffer itself in place
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz dtype as an option.

    torch's casts every update to bf16, which MPS cannot do on older macOS; ns_dtype=torch.float32 runs the same
    iteration in fp32 there. With bf16 (the default) this is torch's own step.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            for p, g, buf in zip(params, grads, bufs):  # as torch.optim._muon._single_tensor_muon
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                lr = group["lr"]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-torch.optim._muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


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
    # MPS: Newton-Schulz in fp32, since bf16 matmuls need macOS 14+ there
    muon = Muon([{"params": hidden, "peak_lr": t.muon_lr}], lr=t.muon_lr, weight_decay=t.weight_decay,
                momentum=t.muon_momentum, nesterov=True, adjust_lr_fn="original",
                ns_dtype=torch.float32 if device_type == "mps" else torch.bfloat16)
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay, "peak_lr": t.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": t.lr},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    return [muon, adamw]


def watch_muon_cost(optimizers: list[torch.optim.Optimizer], device: str, report: Callable[[str], None],
                    note: str = "") -> None:
    """Time Muon's update against the whole step over steps 2-4 (after a warm-up step) and report it once.

    On GPUs without bf16 tensor cores (sm < 8.0) the bf16 Newton-Schulz is estimated at a quarter of a step;
    this measures it on the machine instead of guessing. Uses optimizer step hooks, so the loop is unchanged.
    """
    muon = next((o for o in optimizers if isinstance(o, torch.optim.Muon)), None)
    if muon is None:
        return
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    starts: list[float] = []  # perf_counter at the start of each Muon update
    updates: list[float] = []

    def before(*_):
        if len(starts) > 4:
            return
        sync()
        starts.append(time.perf_counter())
        if len(starts) == 5:
            step, update = (starts[4] - starts[1]) / 3, sum(updates[1:4]) / 3
            dtype = str(getattr(muon, "ns_dtype", torch.bfloat16)).replace("torch.", "")
            report(f"Muon's update (Newton-Schulz in {dtype}) took {update * 1e3:.1f} ms of a {step * 1e3:.1f} ms "
                   f"step ({update / step:.0%}, steps 2-4){note}")

    def after(*_):
        if len(starts) > 4:
            return
        sync()
        updates.append(time.perf_counter() - starts[-1])

    muon.register_step_pre_hook(before)
    muon.register_step_post_hook(after)


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
    """Restore states saved by optimizer_states (or a single AdamW state dict from an older checkpoint).

    The moments and momentum buffers come from the checkpoint; every hyperparameter from the optimizers as built
    from this run's config.
    """
    if isinstance(states, dict):  # checkpoints before optimizers became a list held one AdamW
        states = [states]
    kinds = [type(opt).__name__ for opt in optimizers]
    if not isinstance(states, list) or len(states) != len(optimizers):
        n = len(states) if isinstance(states, list) else 0
        raise ConfigError(f"the checkpoint holds {n} optimizer state(s) but --optimizer={optimizer_name} uses "
                          f"{len(optimizers)} ({', '.join(kinds)}); resume with the optimizer the run was started "
                          "with (see its config.yaml)")
    for opt, state in zip(optimizers, states):
        # load_state_dict also restores the saved hyperparameters (lr, momentum, weight decay, betas, fused...);
        # this run's config sets those, so a change asked for on --resume takes effect.
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"the checkpoint's optimizer state does not fit {type(opt).__name__} ({e}); resume "
                              "with the optimizer and model the run was started with (see its config.yaml)") from None
        for group, h in zip(opt.param_groups, hyper):
            group.update(h)
