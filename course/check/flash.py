"""Self-check for attention in tiles with an online softmax (the forward pass of FlashAttention)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _mismatch,
    _randint,
    _seed,
    _which_variant,
    watching,
)
from course.check.attention import WATCH_ATTENTION
from efficient_training.memory import TensorBytes

# torch._C._nn's builtin is the same object as F.scaled_dot_product_attention, reached by another name
WATCH_FLASH = WATCH_ATTENTION + ("torch._C._nn.scaled_dot_product_attention", "course.check.flash._flash_ref")
BLOCKS = (4, 8, 16, 32)


def _flash_ref(q, k, v, block: int = 64, causal: bool = True, rescale: str = "both") -> torch.Tensor:
    """Attention over key/value tiles of `block` with a running max m, denominator l and output o per query row.

    rescale="both" is the algorithm; "l" (only the denominator follows a new max) and "none" are the two ways of
    forgetting to rescale, kept to name the mistake in a failure message.
    """
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    for qs in range(0, t, block):
        qt = q[:, :, qs:qs + block] * (1.0 / math.sqrt(d))
        n = qt.size(2)
        m = q.new_full((b, h, n, 1), float("-inf"))
        l, o = torch.zeros_like(m), torch.zeros_like(qt)
        for ks in range(0, min(qs + n, t) if causal else t, block):
            s = qt @ k[:, :, ks:ks + block].transpose(-2, -1)
            if causal and ks + block > qs:  # the tile reaches the diagonal: hide keys after each query
                after = torch.arange(ks, ks + s.size(-1), device=q.device) > torch.arange(qs, qs + n,
                                                                                          device=q.device)[:, None]
                s = s.masked_fill(after, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            c = torch.exp(m - m_new)  # exp(-inf) = 0 on the first tile: the empty accumulators stay empty
            l = (l * c if rescale != "none" else l) + p.sum(-1, keepdim=True)
            o = (o * c if rescale == "both" else o) + p @ v[:, :, ks:ks + block]
            m = m_new
        out[:, :, qs:qs + n] = o / l
    return out


def _shape(g: torch.Generator, kind: str) -> tuple[int, int, int, int, int]:
    """(B, H, T, head_dim, block) for one trial; kind says how T relates to the block."""
    block = BLOCKS[_randint(g, 0, len(BLOCKS))]
    b, h, d = _randint(g, 1, 4), _randint(g, 1, 5), _randint(g, 2, 33)
    if kind == "short":  # one partial tile
        t = _randint(g, 1, block + 1)
    elif kind == "whole":  # whole tiles only
        t = block * _randint(g, 2, 6)
    elif kind == "long":  # long enough that the (T, T) scores dwarf any tile, head_dim included
        d = min(d, block)
        t = block * _randint(g, 6, 9) + _randint(g, 1, block)
    else:  # a ragged last tile
        t = block * _randint(g, 1, 5) + _randint(g, 1, block)
    return b, h, t, d, block


def _kind(trial: int, trials: int) -> str:
    if trials >= 3 and trial == trials - 1:
        return "long"
    if trials >= 4 and trial >= trials - 3:
        return "big"
    return ("short", "whole")[trial] if trial < 2 else "ragged"


def _variants(q, k, v, block: int) -> dict:
    return {
        "the output equals attention without the causal mask: position t also attends to later keys":
            F.scaled_dot_product_attention(q, k, v),
        "when a tile raises the running max, the accumulated output o is not rescaled by exp(m_old - m_new) "
        "(the denominator is)": _flash_ref(q, k, v, block, rescale="l"),
        "when a tile raises the running max, neither the accumulated output nor the denominator is rescaled by "
        "exp(m_old - m_new)": _flash_ref(q, k, v, block, rescale="none"),
    }


def _too_big(what: str, seen: TensorBytes, b: int, h: int, t: int) -> str | None:
    """A failure message when fn created a float tensor of half the (B, H, T, T) scores or more."""
    scores = b * h * t * t * 4
    if seen.largest < scores // 2:
        return None
    return (f"{what}\n  right numbers, but your function created a float tensor of {seen.largest:,} bytes; the "
            f"(B, H, T, T) float32 scores are {scores:,}: compute the scores one tile at a time (a block x block or "
            "T x block piece), folding each into the running max, denominator and output, and never all at once")


@_check(hints=(
    "go over the keys and values one tile of `block` positions at a time, and keep for every query row the largest "
    "score seen so far m, the sum l of exp(score - m) and the sum o of exp(score - m) * v; the answer is o / l. "
    "Invariant to test yourself: the result must not depend on `block` (block >= T is plain attention).",
    "Per tile: score the queries against the tile's keys (scaled, with -inf where a key comes after the query), "
    "raise each row's running max to cover the tile, and rescale the old l and o by exp(old max - new max) before "
    "adding the tile's exp(score - new max) sums. Starting from a max of -inf and empty sums needs no special first "
    "tile, since exp(-inf) is 0; tiles entirely after a query block can be skipped. Forgetting to rescale o is the "
    "usual miss."))
def flash_attention(fn: Callable, trials: int = 7, seed: int | None = None, log: bool = True) -> Result:
    """fn(q, k, v, block=...) -> y: causal attention on (B, n_head, T, head_dim) float32 tensors, computed over
    key/value tiles of `block` positions with an online softmax, never creating the (T, T) scores.

    Reference: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) in float64; tolerance
    1e-5 absolute plus 1e-4 relative. Blocks of 4 to 32; T shorter than a block, whole tiles, and a ragged last
    tile. Two trials have q and k ten times larger: scores of a few hundred, whose exp() overflows float32 without
    the running max, and whose float32 rounding alone moves the output by about 1e-4 (SDPA's own float32 answer
    too), so there the tolerance is 1e-3 absolute. The last trial is long: no float tensor fn creates may be half
    the size of the (B, H, T, T) scores.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    called = Counter()
    for trial in range(trials):
        kind = _kind(trial, trials)
        b, h, t, d, block = _shape(g, "ragged" if kind == "big" else kind)
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        if kind == "big":
            q, k = q * 10, k * 10
        what = (f"trial {trial}: q, k, v of shape (B={b}, n_head={h}, T={t}, head_dim={d}), block={block}, "
                + ("q and k ~ N(0, 10^2): scores of a few hundred" if kind == "big" else "standard normal"))
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        atol = 1e-3 if kind == "big" else 1e-5  # scores of ~300 carry float32 rounding of ~1e-4 into the output
        try:
            with watching(WATCH_FLASH, called, fn), TensorBytes() as seen:
                got = fn(q.clone(), k.clone(), v.clone(), block=block)
        except Exception as e:
            return _finish("flash_attention", False, _crash(e, what), s, log)
        called.update(op for op in seen.ops if "scaled_dot_product" in op)  # torch.ops.aten.* by any name
        msg = _mismatch(what, got, expected, atol, 1e-4)
        if msg and isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
            top = float((q @ k.transpose(-2, -1)).abs().max()) / math.sqrt(d)
            msg += (f"\n  hint: the scores reach {top:.4g}; exp() of more than ~88 is inf in float32: subtract the "
                    "running max before exp(), and rescale what was accumulated when the max grows")
        elif msg:
            msg += _which_variant(got, _variants(q, k, v, block), atol=atol)
        msg = msg or (_too_big(what, seen, b, h, t) if kind == "long" else None)
        if msg:
            return _finish("flash_attention", False, msg, s, log)
    return _finish("flash_attention", True, f"{trials} random inputs (blocks 4-32; T below a block, whole tiles, "
                   "a ragged last tile; scores up to a few hundred): equal to scaled_dot_product_attention("
                   "is_causal=True), and no float tensor near the size of the (T, T) scores", s, log,
                   uses_reference=called or _calls_reference(fn, {"scaled_dot_product_attention", "_flash_ref"},
                                                                  (_flash_ref,)))
