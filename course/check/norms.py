"""Self-checks for the normalisation layers: LayerNorm and RMSNorm."""

from __future__ import annotations

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

# ----------------------------------------------------------------------------- normalisation layers


def _layer_norm_variants(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    unbiased = xc / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + eps)
    outside = xc / (torch.sqrt(xc.pow(2).mean(-1, keepdim=True)) + eps)
    no_center = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    affine = (lambda z: z * w + (b if b is not None else 0))
    return {
        "you divide by the unbiased variance (n - 1); LayerNorm uses the biased one: mean((x - mean)^2)":
            affine(unbiased),
        "eps is added to the standard deviation; it belongs inside the square root: sqrt(var + eps)": affine(outside),
        "the mean is not subtracted (that is RMSNorm)": affine(no_center),
        "weight and bias are not applied": xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps),
    }


WATCH_LAYER_NORM = ("torch.nn.functional.layer_norm", "torch.layer_norm", "torch.native_layer_norm",
                    "torch.nn.LayerNorm.forward", "torch.nn.functional.group_norm", "minilm.model.LayerNorm.forward")


@_check(hints=(
    "Normalise each vector over the last dim to mean 0 and variance 1, then scale by weight and add bias when there "
    "is one. Invariant: with weight 1 and no bias every output row has mean about 0 and variance about 1.",
    "Use the biased variance (divide by the dim size, not size - 1 as torch.var does by default), put eps inside the "
    "square root, and skip the bias when it is None."))
def layer_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, weight, bias, eps) -> y: LayerNorm over the last dim of x, bias may be None.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance mean((x - mean)^2).
    Reference: torch.nn.functional.layer_norm; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, t, c = _randint(g, 1, 4), _randint(g, 1, 12), _randint(g, 2, 65)
        eps = [1e-5, 1e-5, 0.5, 1e-6, 0.1, 1e-5][trial % 6]  # large eps shows where it is added
        shift, scale = float(torch.randn(1, generator=g)) * 3, float(torch.rand(1, generator=g)) * 3 + 0.2
        x = torch.randn(b, t, c, generator=g) * scale + shift
        w = 1 + 0.5 * torch.randn(c, generator=g)
        bias = None if trial == 2 else 0.5 * torch.randn(c, generator=g)
        what = (f"trial {trial}: x of shape {(b, t, c)} (mean {shift:.3g}, std {scale:.3g}), eps={eps:g}, "
                f"bias {'None' if bias is None else 'given'}")
        expected = F.layer_norm(x, (c,), w, bias, eps)
        try:
            with watching(WATCH_LAYER_NORM, called, fn):
                got = fn(x.clone(), w.clone(), None if bias is None else bias.clone(), eps)
        except Exception as e:
            return _finish("layer_norm", False, _crash(e, what), s, log)
        msg = _mismatch(what, got, expected, 1e-5, 1e-4)
        if msg:
            return _finish("layer_norm", False, msg + _which_variant(got, _layer_norm_variants(x, w, bias, eps)), s,
                           log)
    return _finish("layer_norm", True, f"{trials} random inputs (shifted, scaled, eps up to 0.5, with and without "
                   "bias): equal to torch.nn.functional.layer_norm within 1e-5", s, log,
                   uses_reference=called or _calls_reference(fn, {"layer_norm", "LayerNorm"}))


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """minilm.model.RMSNorm when this minilm has it, else its formula: in float32, cast back to x's dtype."""
    try:
        from minilm.model import RMSNorm
    except ImportError:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    m = RMSNorm(x.size(-1), eps=eps)
    with torch.no_grad():
        m.weight.copy_(weight)
        return m(x)


def _bf16_rounding(what: str, got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when got is expected up to a rare one-step rounding difference; else how often and how far it differs."""
    d = (got.float() - expected.float()).abs()
    step = torch.finfo(torch.bfloat16).eps * expected.float().abs()
    frac, worst = float((d > 0).float().mean()), float((d / step.clamp_min(1e-30)).max())
    if frac <= 0.02 and worst <= 1.0 + 1e-6:
        return None
    return (f"{what}\n  {100 * frac:.1f}% of your bfloat16 outputs differ from the reference (by up to {worst:.2f} "
            "bfloat16 steps); a float32 computation rounded once at the end matches in nearly all of them\n  hint: "
            "the arithmetic ran in bfloat16 (8 significant bits, every operation rounds): do it in x.float(), then "
            "cast the result back to x.dtype once")


WATCH_RMS_NORM = ("torch.nn.functional.rms_norm", "torch.rms_norm", "torch.nn.RMSNorm.forward",
                  "minilm.model.RMSNorm.forward", "course.check.norms._rms_norm_ref")


@_check(hints=(
    "RMSNorm divides each vector by the root of its mean square (plus eps) and scales by weight: no mean is "
    "subtracted and there is no bias. Invariant: with weight 1 every output row has a mean square of about 1.",
    "Upcast x and weight to float32, do all the arithmetic there and cast to x's dtype once at the end: arithmetic "
    "in bfloat16 rounds at every operation and the check sees it. eps goes inside the root."))
def rms_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, weight, eps) -> y: RMSNorm over the last dim, y = x / sqrt(mean(x^2) + eps) * weight.

    Compute in float32 and return x's dtype (one trial gives bfloat16 x). Reference: minilm.model.RMSNorm;
    tolerance 1e-5 abs + 1e-4 rel in float32. In bfloat16 the float32 result rounded once matches the reference in
    nearly every entry: at most 2% of the entries may differ, by at most one bfloat16 step (2^-7 relative);
    arithmetic done in bfloat16 rounds at every operation and differs in about half of them.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, t, c = _randint(g, 1, 4), _randint(g, 1, 12), _randint(g, 2, 65)
        eps = [1e-6, 0.5, 1e-5, 0.1, 1e-6, 1e-6][trial % 6]
        dtype = torch.bfloat16 if trial == trials - 1 else torch.float32
        x = (torch.randn(b, t, c, generator=g) * (float(torch.rand(1, generator=g)) * 2 + 0.2) + 0.5).to(dtype)
        w = 1 + 0.5 * torch.randn(c, generator=g)
        what = f"trial {trial}: x of shape {(b, t, c)}, dtype {str(dtype).replace('torch.', '')}, eps={eps:g}"
        expected = _rms_norm_ref(x, w, eps)
        try:
            with watching(WATCH_RMS_NORM, called, fn):
                got = fn(x.clone(), w.clone(), eps)
        except Exception as e:
            return _finish("rms_norm", False, _crash(e, what), s, log)
        if isinstance(got, torch.Tensor) and got.dtype != x.dtype:
            return _finish("rms_norm", False, f"{what}\n  expected the output in x's dtype {x.dtype}, got {got.dtype} "
                           "(compute in float32, then .to(x.dtype))", s, log)
        tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
        msg = _mismatch(what, got, expected, *tol)
        if msg:
            xf = x.float()
            variants = {
                "the mean is subtracted: that is LayerNorm, RMSNorm only divides by the root mean square":
                    F.layer_norm(xf, (c,), w, None, eps),
                "eps is missing or outside the square root: sqrt(mean(x^2) + eps)":
                    xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True)) * w,
                "weight is not applied": xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps),
                "you divide by the root of the SUM of squares; RMSNorm uses the mean":
                    xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps) * w,
            }
            return _finish("rms_norm", False, msg + _which_variant(got, variants, *tol), s, log)
        if dtype == torch.bfloat16:
            msg = _bf16_rounding(what, got, expected)
            if msg:
                return _finish("rms_norm", False, msg, s, log)
    return _finish("rms_norm", True, f"{trials} random inputs (eps up to 0.5, one in bfloat16): equal to "
                   "minilm's RMSNorm", s, log, uses_reference=called or _calls_reference(fn, {"RMSNorm", "rms_norm"}))
