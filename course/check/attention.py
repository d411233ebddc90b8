"""Self-checks for attention: scaled dot-product attention, the causal self-attention layer, RoPE."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
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
    _tensor_brief,
    _which_variant,
    watching,
)

# ----------------------------------------------------------------------------- attention

# What each check watches while the learner's function runs (see _harness.watching).
WATCH_ATTENTION = ("torch.nn.functional.scaled_dot_product_attention", "torch.nn.MultiheadAttention.forward",
                   "torch.nn.functional.multi_head_attention_forward", "course.check.attention._attention_ref")
WATCH_LAYER = ("minilm.model.CausalSelfAttention.forward", "torch.nn.MultiheadAttention.forward")
WATCH_ROPE = ("minilm.model.apply_rope", "minilm.model.rope_tables", "course.check.attention._rope_ref")


def _attention_ref(q, k, v, causal=True, scale=None):
    d = q.size(-1)
    att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d) if scale is None else scale)
    if causal:
        t = q.size(-2)
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return att.softmax(dim=-1) @ v


def _attention_hint(q, k, v, got) -> str:
    """Name the usual mistake when the output matches a known wrong variant."""
    d = q.size(-1)
    variants = {
        "the causal mask is missing (each position also attends to later ones)": _attention_ref(q, k, v, False),
        "the scores are not scaled by 1/sqrt(head_dim)": _attention_ref(q, k, v, True, 1.0),
        "the scores are scaled by 1/head_dim instead of 1/sqrt(head_dim)": _attention_ref(q, k, v, True, 1.0 / d),
    }
    for hint, y in variants.items():
        if got.shape == y.shape and torch.allclose(got.float(), y, atol=1e-5, rtol=1e-4):
            return f"\n  hint: your output equals attention where {hint}."
    return ""


@_check(hints=(
    "each query scores every key with a dot product scaled by 1/sqrt(head_dim), and position t may only look at "
    "keys 0..t; a query's weights over the keys are a softmax (positive, summing to 1). Invariant to test yourself: "
    "changing q, k or v at later positions leaves output row t unchanged.",
    "The scores of every query against every key, scaled by 1/sqrt(head_dim), form a (B, n_head, T, T) tensor; set "
    "the entries above the diagonal to -inf before the softmax over the last dim (they become exactly 0), then "
    "weight the values with the result. Writing the softmax yourself, subtract each row's max first: exp() of a "
    "score above ~88 is inf in float32, and softmax does not change when a row is shifted."))
def attention(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(q, k, v) -> y: causal scaled dot-product attention on (B, n_head, T, head_dim) float32 tensors.

    Reference: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True); tolerance 1e-5 absolute
    plus 1e-4 relative. The last two trials have q and k ten times larger (scores of a few hundred).
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    called = Counter()
    for trial in range(trials):
        b, h, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 5), (1, 18), (2, 17)))
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        big = trial >= max(trials - 2, 1)  # scores of a few hundred: exp() overflows unless the max is subtracted
        if big:
            q, k = q * 10, k * 10
        what = (f"trial {trial}: q, k, v of shape (B={b}, n_head={h}, T={t}, head_dim={d}), "
                + ("q and k ~ N(0, 10^2), v standard normal" if big else "standard normal"))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            with watching(WATCH_ATTENTION, called, fn):
                got = fn(q.clone(), k.clone(), v.clone())
        except Exception as e:
            return _finish("attention", False, _crash(e, what), s, log)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return _finish("attention", False, f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, "
                           f"got {shape}", s, log)
        if not torch.isfinite(got).all():
            top = float((q @ k.transpose(-2, -1)).abs().max()) / math.sqrt(d)
            return _finish("attention", False, f"{what}\n  your output holds NaN or inf (expected finite values); the "
                           f"scores reach {top:.4g} in size and exp() of more than ~88 is inf in float32: softmax is "
                           "unchanged by subtracting each row's max first", s, log)
        err = (got.float() - expected).abs()
        if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
            i = np.unravel_index(int(err.argmax()), err.shape)
            msg = (f"{what}\n  largest difference at [b={i[0]}, head={i[1]}, t={i[2]}, dim={i[3]}]: "
                   f"expected {float(expected[i]):.6g}, got {float(got[i]):.6g} (|diff| {float(err.max()):.3g})"
                   + _attention_hint(q, k, v, got))
            return _finish("attention", False, msg, s, log)
    return _finish("attention", True, f"{trials} random (B, n_head, T, head_dim) inputs, T from 1 to 17: "
                   "equal to scaled_dot_product_attention(is_causal=True) within 1e-5", s, log,
                   uses_reference=called or _calls_reference(fn, {"scaled_dot_product_attention"}))


def _csa_hint(x: torch.Tensor, attn, got: torch.Tensor) -> str:
    """Name the mistake when the output equals the layer computed with a known wrong step."""
    b, t, c = x.shape
    h, d = attn.n_head, c // attn.n_head
    with torch.no_grad():
        q, k, v = attn.c_attn(x).split(c, dim=2)
        heads = [z.view(b, t, h, d).transpose(1, 2) for z in (q, k, v)]
        right = F.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2).reshape(b, t, c)
        no_mask = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, t, c)
        wrong_split = F.scaled_dot_product_attention(*[z.reshape(b, h, t, d) for z in (q, k, v)], is_causal=True)
        variants = {
            "the causal mask is missing: position t attends to later positions too": attn.c_proj(no_mask),
            "the heads are cut with reshape(B, n_head, T, head_dim); use view(B, T, n_head, head_dim).transpose(1, 2)":
                attn.c_proj(wrong_split.reshape(b, t, c)),
            "the output projection c_proj is not applied": right,
        }
    for hint, y in variants.items():
        if torch.allclose(got.float(), y, atol=1e-5, rtol=1e-4):
            return f"\n  hint: {hint}"
    return ""


@_check(hints=(
    "Project x once with c_attn, split the result into q, k and v along the last dim, cut each into n_head heads, "
    "run causal attention per head, merge the heads back and apply c_proj. Invariant to test yourself: changing x at "
    "later positions leaves output position t unchanged.",
    "Cut the heads by viewing the last dim as (n_head, head_dim) and then moving the head axis in front of the time "
    "axis; reshaping straight to (B, n_head, T, head_dim) mixes positions with heads. Merge in the reverse order "
    "before c_proj. The usual misses: no causal mask, a wrong head split, c_proj left out."))
def causal_self_attention(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, attn) -> y: the whole attention layer, written with attn's weights, for x of shape (B, T, n_embd).

    attn is a minilm.model.CausalSelfAttention in eval mode: use attn.c_attn (the q, k, v projection, in that
    order along the last dim), attn.n_head and attn.c_proj. Reference: attn(x); tolerance 1e-5 abs + 1e-4 rel.
    """
    from minilm.config import ModelConfig
    from minilm.model import CausalSelfAttention

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    called = Counter()
    for trial in range(trials):
        n_head = int(torch.randint(1, 5, (1,), generator=g))
        n_embd = n_head * int(torch.randint(2, 9, (1,), generator=g)) * 2
        bias = bool(torch.randint(0, 2, (1,), generator=g))
        b, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        attn = CausalSelfAttention(ModelConfig(n_embd=n_embd, n_head=n_head, bias=bias, block_size=32)).eval()
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0.0, 0.3, generator=g)
        x = torch.randn(b, t, n_embd, generator=g)
        what = f"trial {trial}: x of shape (B={b}, T={t}, n_embd={n_embd}), n_head={n_head}, bias={bias}"
        with torch.no_grad():
            expected = attn(x)
            try:
                with watching(WATCH_LAYER, called, fn):  # attn(x) and attn.forward(x) both count as the layer's own
                    got = fn(x.clone(), attn)
            except Exception as e:
                return _finish("causal_self_attention", False, _crash(e, what), s, log)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return _finish("causal_self_attention", False,
                           f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, got {shape}", s, log)
        if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
            err = (got.float() - expected).abs()
            tol = 1e-5 + 1e-4 * expected.abs().amax(dim=(0, 2))
            bad_t = [tt for tt in range(t) if float(err[:, tt].max()) > float(tol[tt])]
            msg = (f"{what}\n  expected y[0, {bad_t[0]}, :] = {_tensor_brief(expected[0, bad_t[0]])}\n"
                   f"  got      y[0, {bad_t[0]}, :] = {_tensor_brief(got[0, bad_t[0]])}\n"
                   f"  positions that differ: {bad_t[:10]}{' ...' if len(bad_t) > 10 else ''} of T={t}")
            variant = _csa_hint(x, attn, got)
            if variant:
                msg += variant
            elif bad_t and bad_t[0] > 0 and t > 1:
                msg += ("\n  hint: the first position is right and later ones are not: look at the causal mask "
                        "(position t may attend to 0..t only)")
            elif n_head > 1:
                msg += ("\n  hint: wrong from the first position: check the head split "
                        "(view(B, T, n_head, head_dim).transpose(1, 2)) and the merge back before c_proj")
            return _finish("causal_self_attention", False, msg, s, log)
    return _finish("causal_self_attention", True, f"{trials} random layers (1-4 heads, with and without bias) "
                   "and inputs: equal to minilm's CausalSelfAttention within 1e-5", s, log,
                   uses_reference=called or _calls_reference(fn, {"CausalSelfAttention"}))

def _rope_ref(x: torch.Tensor, theta: float) -> torch.Tensor:
    """minilm's apply_rope with rope_tables when this minilm has them, else the same formula (Llama convention)."""
    t, hd = x.size(-2), x.size(-1)
    try:
        from minilm.model import apply_rope, rope_tables
    except ImportError:
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        emb = torch.cat([torch.outer(torch.arange(t, dtype=torch.float32), inv)] * 2, dim=-1)
        rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
        return x * emb.cos() + rot * emb.sin()
    cos, sin = rope_tables(hd, t, theta)
    return apply_rope(x, cos[:t], sin[:t])


@_check(hints=(
    "RoPE rotates pairs of dimensions by an angle proportional to the position, one frequency per pair, so it "
    "changes directions but not lengths. Invariants to test yourself: position 0 comes out unchanged, and every "
    "vector keeps its norm.",
    "minilm uses the Llama layout: dim i is paired with dim i + head_dim/2, not with its neighbour, and the "
    "frequencies fall from 1 towards 1/theta across the pairs. Make the angle table (positions times frequencies) "
    "once, repeat it for both halves, and add cos times x to sin times rotate_half(x), which puts the negated second "
    "half in front."))
def rope(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, theta) -> x rotated: rotary position embedding of x (B, n_head, T, head_dim) at positions 0..T-1.

    inv_freq = 1 / theta^(arange(0, hd, 2) / hd); angles = outer(positions, inv_freq), repeated: cat(a, a);
    y = x * cos(angles) + rotate_half(x) * sin(angles), rotate_half(x) = cat(-x[..., hd/2:], x[..., :hd/2]) (the
    Hugging Face Llama convention, which pairs dim i with dim i + hd/2). Reference: minilm.model.apply_rope with
    rope_tables; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    called = Counter()
    for trial in range(trials):
        b, h, t, hd = _randint(g, 1, 3), _randint(g, 1, 4), _randint(g, 2, 40), 2 * _randint(g, 1, 17)
        theta = [10000.0, 500.0, 10000.0, 1e6, 100.0][trial % 5]
        x = torch.randn(b, h, t, hd, generator=g)
        what = f"trial {trial}: x of shape (B={b}, n_head={h}, T={t}, head_dim={hd}), theta={theta:g}"
        expected = _rope_ref(x, theta)
        try:
            with watching(WATCH_ROPE, called, fn):
                got = fn(x.clone(), theta)
        except Exception as e:
            return _finish("rope", False, _crash(e, what), s, log)
        msg = _mismatch(what, got, expected, 1e-5, 1e-4)
        if msg:
            ang = torch.outer(torch.arange(t, dtype=torch.float32), 1.0 / theta ** (torch.arange(0, hd, 2) / hd))
            x1, x2 = x[..., 0::2], x[..., 1::2]
            inter = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)
            emb = torch.cat([ang, ang], -1)
            rot = torch.cat([x[..., hd // 2:], -x[..., : hd // 2]], dim=-1)
            variants = {"you rotate adjacent pairs (0,1), (2,3), ... (the original RoFormer layout); minilm pairs "
                        "dim i with dim i + head_dim/2 (rotate_half)": inter,
                        "rotate_half has the wrong sign: cat(-x2, x1), not cat(x2, -x1)":
                            x * emb.cos() + rot * emb.sin(),
                        "position 0 is not the identity: positions start at 0": _rope_ref(
                            torch.cat([torch.zeros_like(x[..., :1, :]), x], -2), theta)[..., 1:, :]}
            return _finish("rope", False, msg + _which_variant(got, variants), s, log)
    return _finish("rope", True, f"{trials} random inputs (head_dim 2-32, theta 100 to 1e6): equal to minilm's "
                   "apply_rope within 1e-5", s, log,
                   uses_reference=called or _calls_reference(fn, {"apply_rope", "rope_tables"}))
