"""The compiled decode step: one torch.compile'd graph per (batch bucket, length bucket, weight format).

A graph is specialised on its shapes, so the decoder hands it fixed ones: the batch padded up to a power of two,
the cache's length rounded up to a multiple of 64 (capped at block_size), and the whole cache attended with a
mask. Each model keeps its own graphs (graphs_for), each compiled from its own copy of decode_step: torch.compile
counts recompilations per code object, and one shared function hit its limit of 8 at the 9th shape. Past
`max_graphs` a new shape runs eagerly, with one log line, and so does a shape whose compilation fails.
"""

from __future__ import annotations

import logging
import math
import shutil
import types
import weakref

import torch

from minilm.inference.cache import StepWrite
from minilm.quantize import BF16Linear, Int8Linear, W8A8Linear

log = logging.getLogger("minilm.inference")
MAX_GRAPHS = 16


class CompilerMissing(RuntimeError):
    """compile=True on a CPU without a C++ compiler."""


def check_compiler(device: torch.device | str) -> None:
    """torch.compile on a CPU builds C++ kernels: fail with what to do when there is no compiler."""
    found = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    if torch.device(device).type == "cpu" and not found:
        raise CompilerMissing("compiled decoding needs a C++ compiler on a CPU (torch.compile builds C++ kernels), and "
                              "none was found: install one (Debian/Ubuntu: apt install g++; macOS: xcode-select "
                              "--install) or decode without compile")


def batch_bucket(n: int) -> int:
    """Rows a compiled step runs for n sequences: the next power of two (3 and 4 share a graph)."""
    return 1 << max(0, n - 1).bit_length()


def length_bucket(block_size: int, tokens: int) -> int:
    """Cache columns for sequences of up to `tokens` positions: a multiple of 64, at most block_size (past it a
    row is refilled, compiled or not). Calls of similar lengths share a graph; the extra columns are masked."""
    return min(block_size, 64 * math.ceil(tokens / 64))


def weights_of(model: torch.nn.Module) -> str:
    """The weight format minilm.quantize.use_weights gave the model's output head."""
    head = model.lm_head
    if isinstance(head, W8A8Linear):
        return "w8a8"
    return "int8" if isinstance(head, Int8Linear) else "bf16" if isinstance(head, BF16Linear) else "fp32"


def decode_step(model, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, k: list[torch.Tensor],
                v: list[torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
    """Logits (n, 1, vocab) for one new token per row, written into the cache at cols: what gets compiled."""
    logits, _ = model(idx, cache=StepWrite(k, v, cols, mask.size(-1)), pos=pos, attn_mask=mask)
    return logits


def _own_copy(fn):
    """fn with a code object of its own, so torch.compile keeps (and counts) its graphs apart from fn's."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Graphs:
    """One model's compiled decode steps by (batch bucket, length bucket, weights); at most max_graphs."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, backend: str = "inductor"):
        self.max_graphs, self.backend = max_graphs, backend
        self.steps: dict[tuple, object] = {}
        self.eager: set[tuple] = set()  # shapes that run uncompiled: over the limit, or compilation failed

    def run(self, model, key: tuple, *args) -> torch.Tensor:
        step = self.steps.get(key)
        if step is None and key not in self.eager:
            if len(self.steps) >= self.max_graphs:
                log.warning("decode step for batch x length x weights %s runs eagerly: this model already has "
                            "%d compiled graphs (the limit)", key, self.max_graphs)
                self.eager.add(key)
            else:
                step = torch.compile(_own_copy(decode_step), backend=self.backend, fullgraph=True, dynamic=False)
                self.steps[key] = step
        if step is None:
            return decode_step(model, *args)
        try:
            with torch.no_grad():  # a graph without autograd (the int8 kernels have no derivative)
                return step(model, *args)
        except Exception as e:  # noqa: BLE001 - a compiler failure costs speed, not the generation
            log.warning("compiling the decode step for %s failed, it runs eagerly: %s: %s", key, type(e).__name__, e)
            del self.steps[key]
            self.eager.add(key)
            return decode_step(model, *args)


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphs_for(model: torch.nn.Module) -> Graphs:
    """The model's Graphs, made on first use; they go when the model does."""
    if model not in _GRAPHS:
        _GRAPHS[model] = Graphs()
    return _GRAPHS[model]
