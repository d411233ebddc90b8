"""Self-check for activation checkpointing by hand: the gradients of torch.utils.checkpoint, with less saved."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_ckpt

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _mismatch,
    _randint,
    _seed,
    watching,
)

WATCH_CHECKPOINT = ("torch.utils.checkpoint.checkpoint", "torch.utils.checkpoint.checkpoint_sequential",
                    "torch.utils.checkpoint.CheckpointFunction.forward",
                    "torch.utils.checkpoint.CheckpointFunction.backward",
                    "efficient_training.checkpointing.checkpoint",
                    "efficient_training.checkpointing.CheckpointFunction.forward",
                    "efficient_training.checkpointing.CheckpointFunction.backward",
                    "efficient_training.checkpointing.CheckpointedBlock.forward")


class _Block(nn.Module):
    """A residual MLP with dropout, called as block(x, scale, flag): scale is a tensor that needs no gradient
    (or None) and flag a plain bool, like the non-tensor arguments a transformer block takes."""

    def __init__(self, width: int, hidden: int, layers: int, p: float, g: torch.Generator):
        super().__init__()
        dims = [width] + [hidden] * layers + [width]
        self.lin = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.drop = nn.Dropout(p)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)

    def forward(self, x, scale=None, flag=True):
        h = x
        for i, lin in enumerate(self.lin):
            h = lin(h)
            if i < len(self.lin) - 1:
                h = self.drop(torch.nn.functional.gelu(h))
        if scale is not None:
            h = h * scale
        return x + h if flag else h


def _run(block, x, extra, w, seed, call, amp=False):
    """(output, grad of x, grads of the parameters, next random number, saved bytes) of one backward; with amp the
    forward runs under CPU bf16 autocast and backward outside it, as in a training step."""
    from efficient_training.checkpointing import saved_tensor_bytes

    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    box = {}

    def forward():
        torch.manual_seed(seed)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            out = call(block, x, *extra)
        box["out"] = out
        box["noise"] = torch.rand(8)  # the training's own random numbers between forward and backward
        box["loss"] = (out * w).sum()

    nbytes = saved_tensor_bytes(forward, exclude=block)
    box["loss"].backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
    after = torch.rand(1).item()  # the stream after backward: recomputing must not move it
    return box["out"], x.grad, grads, (box["noise"], after), nbytes


def _compare_grads(what, got, ref, amp=False) -> str | None:
    out, gx, gp, _, _ = got
    rout, rgx, rgp, _, _ = ref
    msg = _mismatch(what + " (forward output)", out, rout.detach(), 1e-5, 1e-5, "out")
    if msg:
        return msg
    if gx is None:
        return f"{what}\n  x got no gradient: backward must return one gradient per input of forward"
    msg = _mismatch(what + " (gradient of x)", gx, rgx, 1e-5, 1e-4, "x.grad")
    for i, (a, b) in enumerate(zip(gp, rgp)):
        msg = msg or _mismatch(what + f" (gradient of parameter {i})", a, b, 1e-5, 1e-4, "p.grad")
    if msg and amp:
        msg += ("\n  hint: forward ran under torch.autocast, backward runs outside it: save "
                "torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in forward and recompute "
                "under the same torch.autocast")
    elif msg and float(sum(a.abs().sum() for a in gp)) == 0.0:
        msg += ("\n  hint: the parameters got no gradient: in backward recompute fn(*inputs) under "
                "torch.enable_grad() from detached inputs that require grad, then torch.autograd.backward it")
    elif msg:
        msg += ("\n  hint: with dropout the recomputation must draw the same masks: save torch.get_rng_state() in "
                "forward and restore it (inside torch.random.fork_rng()) before recomputing")
    return msg


def _trial(fn, g: torch.Generator, trial: int, called: Counter, amp: bool = False) -> str | None:
    width, hidden, layers = _randint(g, 4, 24), _randint(g, 16, 64), _randint(g, 1, 4)
    p = [0.0, 0.3, 0.5][trial % 3] if trial else 0.2
    block = _Block(width, hidden, layers, p, g).train()
    batch = _randint(g, 2, 6)
    x = torch.randn(batch, width, generator=g)
    w = torch.randn(batch, width, generator=g)
    extra = [(), (torch.rand(width, generator=g) + 0.5, False), (None, True)][trial % 3]
    seed = _randint(g, 0, 2**30)
    what = (f"trial {trial}: block of {layers + 1} Linear layers ({width} -> {hidden} -> {width}), dropout {p}, "
            f"x of shape {(batch, width)}, extra arguments {[type(a).__name__ for a in extra]}"
            + (", forward under bf16 autocast" if amp else ""))
    plain = _run(block, x, extra, w, seed, lambda b, *a: b(*a), amp)
    ref = _run(block, x, extra, w, seed, lambda b, *a: torch_ckpt.checkpoint(b, *a, use_reentrant=True), amp)
    try:
        with watching(WATCH_CHECKPOINT, called, fn):
            got = _run(block, x, extra, w, seed, fn, amp)
    except Exception as e:
        return _crash(e, what)
    msg = (_compare_grads(what, got, ref, amp)
           or _compare_grads(what + " against a plain backward", got, plain, amp))
    if msg:
        return msg
    (noise, after), (ref_noise, ref_after) = got[3], plain[3]
    if not torch.equal(noise, ref_noise) or after != ref_after:
        return (f"{what}\n  gradients are right, but the random numbers drawn after your checkpointed call differ "
                "from a plain run's: the recomputation moved the training's RNG stream\n  hint: restore the saved "
                "state inside `with torch.random.fork_rng():` so the stream is put back when backward ends")
    if got[4] > ref[4] + 64 or got[4] >= plain[4]:
        return (f"{what}\n  gradients are right, but backward keeps {got[4]:,} bytes of activations: "
                f"a plain call keeps {plain[4]:,}, torch.utils.checkpoint {ref[4]:,}\n  hint: forward should run "
                "fn under torch.no_grad() and ctx.save_for_backward only the tensor inputs; the graph inside fn is "
                "rebuilt in backward")
    return None


@_check(hints=(
    "Forward runs fn without building a graph and keeps only the inputs (and the RNG state); backward runs fn "
    "again, this time with gradients on, and backpropagates the incoming gradient through that fresh copy. "
    "Invariant: the gradients equal a plain backward's, even with dropout and under autocast.",
    "In a torch.autograd.Function: forward saves torch.get_rng_state(), the autocast state "
    "(torch.is_autocast_enabled(d), torch.get_autocast_dtype(d) for d in cpu, cuda), the tensor inputs with "
    "ctx.save_for_backward and the other arguments as they are, then returns fn(*args) under torch.no_grad(). "
    "backward detaches the inputs (requires_grad_ as before), restores the RNG state inside "
    "torch.random.fork_rng(), recomputes under torch.enable_grad() and the saved torch.autocast, calls "
    "torch.autograd.backward(outputs, grad_outputs) and returns (None for fn, then each input's .grad or None).",
))
def activation_checkpoint(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(block, *args) -> block(*args), keeping only the inputs for backward and recomputing the rest.

    Random residual MLP blocks with dropout, called with a tensor, a tensor that needs no gradient, None and a
    bool. The forward output and the gradients of x and of the parameters must equal torch.utils.checkpoint's and a
    plain backward's (1e-5 abs + 1e-4 rel); the random numbers drawn after backward must be a plain run's; and the
    bytes saved for backward (torch.autograd.graph.saved_tensors_hooks) must be at most torch.utils.checkpoint's.
    One more block runs its forward under CPU bf16 autocast and backward outside it, as a training step does: the
    recomputation must run in the first pass's precision.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials + 1):  # the last one under bf16 autocast, as MyGPT trains on a GPU
        msg = _trial(fn, g, trial, called, amp=trial == trials)
        if msg:
            return _finish("activation_checkpoint", False, msg, s, log)
    return _finish("activation_checkpoint", True, f"{trials + 1} random blocks with dropout (one under bf16 "
                   "autocast): the gradients of "
                   "torch.utils.checkpoint and of a plain backward, the same RNG stream, and no more saved "
                   "activations than torch.utils.checkpoint", s, log,
                   uses_reference=called or _calls_reference(fn, {"checkpoint", "CheckpointFunction",
                                                                  "checkpoint_sequential", "CheckpointedBlock"}))
