"""Mixed precision by hand: a dynamic loss scaler and a master-weights training step.

Half-precision gradients underflow: fp16 has no numbers below ~6e-8, and many gradients of a language model are
smaller. Multiplying the loss by a large scale S multiplies every gradient by S (backward is linear), which lifts
them into range; dividing by S again in fp32 before the optimizer step gives the true gradient back. When S is so
large that a gradient overflows to inf (or NaN), the step is skipped and S is halved; after `growth_interval`
clean steps in a row S is doubled again. This is what `torch.amp.GradScaler` does, and LossScaler below follows
its interface and its arithmetic exactly, so the two produce the same scale sequence, the same skipped steps and
the same parameters (see tests/test_efficient_amp.py and `compare_with_grad_scaler`).

    scaler = LossScaler()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                  # optional: only needed to clip true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)                      # skipped when any gradient is inf/NaN
    scaler.update()                             # back off or grow the scale

The second half of the file is the classic mixed-precision recipe (Micikevicius et al., 2018) written out: the
optimizer owns fp32 "master" weights, a half-precision copy of the model runs forward and backward, its gradients
are copied to the master weights, the step happens in fp32 and the new weights are copied back into the half copy.
On CPU bfloat16 autocast is the practical path (`autocast_context`); fp16 runs wherever the device supports it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn


class LossScaler:
    """Dynamic loss scaling with GradScaler's interface: scale, unscale_, step, update, get_scale, state_dict."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not init_scale > 0 or not math.isfinite(init_scale):
            raise ValueError(f"init_scale={init_scale} must be a finite number > 0 (typical: 2**16)")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor={growth_factor} must be > 1 (typical: 2.0)")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={backoff_factor} must be in (0, 1) (typical: 0.5)")
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval={growth_interval!r} must be a positive integer (typical: 2000)")
        # The scale lives in float32 like GradScaler's, so products such as scale * 0.3 round the same way.
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._growth_tracker = 0  # clean steps in a row since the last growth or backoff
        self._enabled = enabled
        self._found_inf: dict[int, bool] = {}  # id(optimizer) -> found inf/NaN at unscale_, this iteration
        self._stepped: set[int] = set()

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return float(self._scale) if self._enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Return loss * scale; call .backward() on the result."""
        if not self._enabled:
            return loss
        return loss * self._scale.to(loss.device)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient the optimizer owns by the scale, in place, and record whether any is inf/NaN."""
        if not self._enabled:
            return
        key = id(optimizer)
        if key in self._found_inf:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        if key in self._stepped:
            raise RuntimeError("unscale_() is being called after step(); call update() first")
        # The reciprocal in float64 then rounded to float32, as GradScaler does: a float32 1/x can be off by an ulp.
        inv_scale = float(self._scale.double().reciprocal().float())
        finite = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.dtype == torch.float16:
                        raise ValueError("the optimizer holds fp16 gradients: unscaling them in fp16 loses the "
                                         "small ones. Keep fp32 parameters (autocast) or fp32 master weights.")
                    # Every gradient is checked: one inf anywhere makes the whole update wrong.
                    finite.append(torch.isfinite(p.grad).all())
                    p.grad.mul_(inv_scale)
        # One device-to-host sync for all the checks instead of one per parameter.
        found = bool(finite) and not bool(torch.stack([f.to(finite[0].device) for f in finite]).all())
        self._found_inf[key] = found

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Unscale if not done yet, then optimizer.step() unless a gradient was inf/NaN (then skip, return None)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        key = id(optimizer)
        if key in self._stepped:
            raise RuntimeError("step() was already called on this optimizer since the last update()")
        if key not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(key)
        if self._found_inf[key]:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Back off after an overflow, grow after growth_interval clean steps; or set new_scale directly."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale.fill_(float(new_scale))
        else:
            if not self._found_inf:
                raise RuntimeError("update() without a step: call scaler.step(optimizer) (or unscale_) first")
            if any(self._found_inf.values()):
                self._scale.fill_(float(self._scale) * self._backoff_factor)
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    grown = float(self._scale) * self._growth_factor
                    if math.isfinite(float(torch.tensor(grown, dtype=torch.float32))):
                        self._scale.fill_(grown)
                    self._growth_tracker = 0
        self._found_inf = {}
        self._stepped = set()

    def found_inf(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the last unscale_ of this optimizer saw an inf/NaN gradient (the step is/was skipped)."""
        return self._found_inf.get(id(optimizer), False)

    def state_dict(self) -> dict:
        """Same keys as GradScaler.state_dict(), so either can load the other's state."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        if not self._enabled:
            return
        if not state:
            raise RuntimeError("the state dict is empty: it was saved from a disabled scaler")
        self._scale.fill_(float(state["scale"]))
        self._growth_factor = float(state["growth_factor"])
        self._backoff_factor = float(state["backoff_factor"])
        self._growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast for bf16/fp16, or a no-op for fp32 (dtype None or float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def half_copy(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A copy of model with every floating tensor in dtype; tied weights stay tied (deepcopy keeps sharing)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype} must be torch.float16 or torch.bfloat16")
    return copy.deepcopy(model).to(dtype)


def grads_to_master(half_model: nn.Module, master_model: nn.Module) -> None:
    """master.grad = float32(half.grad) for each parameter pair (None where the half copy has no gradient)."""
    for h, m in zip(half_model.parameters(), master_model.parameters(), strict=True):
        m.grad = None if h.grad is None else h.grad.detach().float()


@torch.no_grad()
def master_to_half(master_model: nn.Module, half_model: nn.Module) -> None:
    """Round the fp32 master weights into the half copy after a step."""
    for m, h in zip(master_model.parameters(), half_model.parameters(), strict=True):
        h.copy_(m)


def master_weights_step(half_model: nn.Module, master_model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: LossScaler, loss_fn: Callable[[nn.Module], torch.Tensor],
                        grad_clip: float = 0.0) -> tuple[float, bool]:
    """One mixed-precision step: half forward/backward, fp32 master update. Returns (loss, skipped).

    `optimizer` must own master_model's (fp32) parameters; `loss_fn(half_model)` returns the loss (compute the
    loss itself in fp32, e.g. cross-entropy on logits.float()). Why master weights: an update lr*grad smaller than
    half an ulp of the weight vanishes when added in half precision (bf16 has 8 bits of mantissa), but is kept in
    the fp32 copy and eventually shows up in the half weights.
    """
    half_model.zero_grad(set_to_none=True)
    loss = loss_fn(half_model)
    scaler.scale(loss).backward()
    grads_to_master(half_model, master_model)
    scaler.unscale_(optimizer)  # true fp32 gradients before clipping
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(master_model.parameters(), grad_clip)
    scaler.step(optimizer)
    skipped = scaler.found_inf(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        master_to_half(master_model, half_model)
    return loss.item(), skipped


# ---------------------------------------------------------------------------------------------------------------
# The proof: a scripted run with injected overflows, our scaler next to GradScaler.


def _proof_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 10))


def scripted_run(scaler, steps: int = 12, overflow_steps: tuple[int, ...] = (2, 3, 7),
                 nan_steps: tuple[int, ...] = (9,), dtype: torch.dtype | None = torch.bfloat16,
                 grad_clip: float = 1.0, seed: int = 0) -> dict:
    """Train a small MLP with `scaler` (ours or torch.amp.GradScaler) under autocast, injecting bad gradients.

    At `overflow_steps` the last layer's weight gradient gets an inf, at `nan_steps` its bias gets a NaN -- in
    the last parameter the optimizer owns, so a scaler that only inspects some gradients misses it. Returns the
    scale before each step, which steps were skipped, the losses and the final parameters.
    """
    model = _proof_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    scales, skipped, losses = [], [], []
    for step in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        with autocast_context("cpu", dtype):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        if step in overflow_steps:
            model[-1].weight.grad[0, 0] = float("inf")
        if step in nan_steps:
            model[-1].bias.grad[0] = float("nan")
        scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        before = [p.detach().clone() for p in model.parameters()]
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        skipped.append(unchanged)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
    scales.append(scaler.get_scale())
    return {"scales": scales, "skipped": skipped, "losses": losses,
            "params": [p.detach().clone() for p in model.parameters()], "state": scaler.state_dict()}


def compare_with_grad_scaler(make_scaler: Callable[..., object] = LossScaler, init_scale: float = 2.0**10,
                             growth_interval: int = 3, backoff_factor: float = 0.5, **run_kwargs) -> dict:
    """Run scripted_run with make_scaler(...) and with torch.amp.GradScaler; report where they differ.

    Returns {"ours": run, "torch": run, "same_scales", "same_skips", "max_param_diff", "ok"}; ok means the
    scale sequences and skipped steps are identical and the parameters agree within 1e-7.
    """
    kw = dict(init_scale=init_scale, growth_factor=2.0, backoff_factor=backoff_factor, growth_interval=growth_interval)
    ours = scripted_run(make_scaler(**kw), **run_kwargs)
    ref = scripted_run(torch.amp.GradScaler("cpu", **kw), **run_kwargs)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours["params"], ref["params"]))
    if any(math.isnan(float(p.sum())) for p in ours["params"]):
        diff = float("inf")
    same_scales = ours["scales"] == ref["scales"]
    same_skips = ours["skipped"] == ref["skipped"]
    return {"ours": ours, "torch": ref, "same_scales": same_scales, "same_skips": same_skips,
            "max_param_diff": diff, "ok": same_scales and same_skips and diff <= 1e-7}
