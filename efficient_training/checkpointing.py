"""Activation checkpointing by hand: keep a block's input, drop everything inside it, recompute it in backward.

Backward needs the activations of forward (the input of every matmul, every GELU, every softmax). A GPT keeps
O(n_layer * batch * seq * n_embd) of them (plus batch * n_head * seq^2 when attention is not fused). Checkpointing
a block stores only its input; in backward it runs the block's forward again, with gradients on, and
backpropagates through that fresh copy. Cost: one extra forward per block (~+30% step time); gain: the block's
internals are never kept across the whole forward pass.

The recomputation has to see the same random numbers as the first pass, or dropout masks differ and the
gradients are wrong. So the RNG state is saved at the start of forward and restored for the recomputation
(inside fork_rng, so training's own RNG stream is not disturbed).

    from efficient_training.checkpointing import apply_checkpointing
    apply_checkpointing(model)          # wraps every block of model.transformer.h
    loss.backward()                     # works with .backward(); not with torch.autograd.grad(loss, params)

The last limitation is the same as torch.utils.checkpoint(use_reentrant=True): the recomputed block is
backpropagated by a nested backward() call, which accumulates into the parameters' .grad directly.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    return {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")}


class CheckpointFunction(torch.autograd.Function):
    """forward: run fn without keeping its graph; backward: rerun fn with the saved RNG state and backprop it."""

    @staticmethod
    def forward(ctx, fn, preserve_rng_state, *args):
        ctx.fn = fn
        ctx.preserve_rng_state = preserve_rng_state
        ctx.autocast = _autocast_state()  # the recomputation must run in the same precision as the first pass
        if preserve_rng_state:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_devices = sorted({a.device.index or 0 for a in args if torch.is_tensor(a) and a.is_cuda})
            ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        # Only the inputs are kept; non-tensor arguments (None, ints) are remembered as they are.
        ctx.is_tensor = [torch.is_tensor(a) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a, t in zip(args, ctx.is_tensor) if t])
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        inputs = []
        for is_t, other in zip(ctx.is_tensor, ctx.others):
            if is_t:
                t = next(saved)
                inputs.append(t.detach().requires_grad_(t.requires_grad))
            else:
                inputs.append(other)
        devices = ctx.cuda_devices if ctx.preserve_rng_state else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng_state):
            if ctx.preserve_rng_state:
                torch.set_rng_state(ctx.cpu_rng)
                for d, state in zip(ctx.cuda_devices, ctx.cuda_rng):
                    torch.cuda.set_rng_state(state, d)
            (cpu_on, cpu_dt), (cuda_on, cuda_dt) = ctx.autocast["cpu"], ctx.autocast["cuda"]
            with torch.enable_grad(), torch.autocast("cpu", cpu_dt, enabled=cpu_on), \
                    torch.autocast("cuda", cuda_dt, enabled=cuda_on):
                outputs = ctx.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [a.grad if torch.is_tensor(a) and a.requires_grad else None for a in inputs]
        return (None, None, *grads)


def checkpoint(fn, *args, preserve_rng_state: bool = True):
    """fn(*args), storing only args for backward and recomputing fn's activations when gradients are needed.

    preserve_rng_state=False skips the RNG bookkeeping: faster, but wrong gradients under dropout.
    """
    if torch.is_grad_enabled() and not any(torch.is_tensor(a) and a.requires_grad for a in args):
        warnings.warn("checkpoint(): no input requires grad, so the parameters inside fn will get no gradients; "
                      "pass at least one tensor that requires grad (e.g. the block's input activations)",
                      stacklevel=2)
    return CheckpointFunction.apply(fn, preserve_rng_state, *args)


class CheckpointedBlock(nn.Module):
    """A transformer block that checkpoints itself while training; plain forward in eval or with a KV cache."""

    def __init__(self, block: nn.Module, preserve_rng_state: bool = True):
        super().__init__()
        self.block = block
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x, cache=None, layer: int = 0, attn_mask=None, rope=None):
        if self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(self.block, x, None, layer, attn_mask, rope, preserve_rng_state=self.preserve_rng_state)
        return self.block(x, cache, layer, attn_mask, rope)


def apply_checkpointing(model: nn.Module, enabled: bool = True, preserve_rng_state: bool = True) -> nn.Module:
    """Wrap (enabled=True) or unwrap (False) every block of a minilm GPT's model.transformer.h, in place.

    The wrapper adds ".block" to the blocks' state_dict keys: unwrap before saving a checkpoint for minilm.
    """
    cfg = getattr(model, "config", None)
    if enabled and getattr(cfg, "grad_checkpoint", False):
        raise ValueError("model.config.grad_checkpoint=True already checkpoints with torch.utils.checkpoint; "
                         "set it to False before applying this package's checkpointing")
    h = model.transformer.h
    for i, block in enumerate(h):
        inner = block.block if isinstance(block, CheckpointedBlock) else block
        h[i] = CheckpointedBlock(inner, preserve_rng_state) if enabled else inner
    return model


def saved_tensor_bytes(fn, exclude: nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn() runs (the activation memory).

    Counted with torch.autograd.graph.saved_tensors_hooks, once per storage; storages of `exclude`'s parameters
    (weights saved by matmuls) are not activations and are left out. Works on any device, CPU included.
    Tensors saved inside torch.utils.checkpoint's own hooks are invisible here (they are not kept anyway).
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_memory(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Saved-tensor bytes of one training forward pass of model on (idx, targets)."""
    model.train()
    return saved_tensor_bytes(lambda: model(idx, targets), exclude=model)
