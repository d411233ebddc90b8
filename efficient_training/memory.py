"""Peak memory of one call: the CUDA allocator's own peak on a GPU; on a CPU, where PyTorch keeps no allocation
peak, the most bytes of tensors alive at once among those the call's operators create.

    from efficient_training.memory import peak_bytes, TensorBytes
    peak_bytes(lambda: attention(q, k, v))      # bytes above what was allocated before the call

The CPU count watches every aten operator with a TorchDispatchMode: each output's storage is counted once (views
and in-place results share it) from its creation until the last tensor using it is freed. It sees what the
operators return, output included, and not a kernel's private scratch buffers or the allocator's rounding, so
it compares two functions written in PyTorch operators, not against a fused kernel (SDPA's CPU flash kernel
keeps its tiles inside). Tensors autograd saves for backward count as alive for as long as the graph holds them.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytes(TorchDispatchMode):
    """While active: `peak`, the most bytes alive at once of the storages operators created, `now` (alive at the
    end), `largest`, the bytes of the largest single floating-point tensor an operator returned, and `ops`, how
    many times each operator ran ("aten.mm.default": 3)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = self.largest = 0
        self.ops: Counter[str] = Counter()
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive that use it]
        self._refs: dict[int, weakref.ref] = {}  # keep the weak references alive so their callbacks run

    def _freed(self, key: int, ref: weakref.ref) -> None:
        self._refs.pop(id(ref), None)
        entry = self._live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self._live[key]

    def _track(self, t: torch.Tensor) -> None:
        if t.is_floating_point():
            self.largest = max(self.largest, t.numel() * t.element_size())
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key not in self._live:
            self._live[key] = [size, 0]
            self.now += size
            self.peak = max(self.peak, self.now)
        self._live[key][1] += 1
        ref = weakref.ref(t, lambda r, key=key: self._freed(key, r))
        self._refs[id(ref)] = ref

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes fn() allocates above what was allocated before: max_memory_allocated on CUDA, else TensorBytes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    with TensorBytes() as seen:
        out = fn()
    del out
    return seen.peak
