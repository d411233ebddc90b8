"""Self-checks for the optimizer pieces: an AdamW step, the learning-rate schedule, gradient clipping."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import torch

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

# ----------------------------------------------------------------------------- the optimizer and the loop


def _adamw_variant(p, g, m, v, t, lr, b1, b2, eps, wd, kind):
    if kind == "coupled":
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m, v) if kind == "no_bias_correction" else (m / (1 - b1**t), v / (1 - b2**t))
    den = torch.sqrt(vh + eps) if kind == "eps_inside" else torch.sqrt(vh) + eps
    p = p if kind == "coupled" else p * (1 - lr * wd)
    return p - lr * mh / den, m, v


WATCH_ADAMW = ("torch.optim.AdamW.step", "torch.optim.Adam.step", "torch.optim.adamw.adamw", "torch.optim.adam.adam",
               "course.check.optim._adamw_variant")


@_check(hints=(
    "AdamW keeps running averages of the gradient (m) and of its square (v), corrects their bias towards zero in "
    "early steps, and moves along m_hat / (sqrt(v_hat) + eps); weight decay shrinks p directly instead of joining "
    "the gradient. Invariant: without weight decay the first step moves every coordinate by about lr.",
    "Within a step: decay p by lr * weight_decay * p, update m with beta1 and v with beta2, bias-correct with 1 - "
    "beta^t for the 1-based t, then step. Adding the decay to the gradient (Adam with L2) or counting t from 0 are "
    "the mistakes the check catches."))
def adamw(fn: Callable, trials: int = 3, steps: int = 20, seed: int | None = None, log: bool = True) -> Result:
    """fn(p, grad, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v): one AdamW step, t = 1, 2, ...

    m and v start at zero. Decoupled weight decay (p shrinks by lr * weight_decay * p, not added to the gradient),
    bias correction m / (1 - beta1^t), v / (1 - beta2^t), update lr * m_hat / (sqrt(v_hat) + eps). The check runs
    `steps` steps with fresh random gradients next to torch.optim.AdamW; tolerance 1e-6 abs + 1e-5 rel each step.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        shape = (_randint(g, 1, 6), _randint(g, 1, 9))
        lr = [1e-2, 3e-3, 0.1][trial % 3]
        b1, b2 = [(0.9, 0.999), (0.8, 0.95), (0.9, 0.98)][trial % 3]
        eps, wd = [1e-8, 1e-3, 1e-6][trial % 3], [0.1, 0.0, 0.5][trial % 3]
        what = (f"trial {trial}: a parameter of shape {shape}, lr={lr:g}, betas=({b1}, {b2}), eps={eps:g}, "
                f"weight_decay={wd:g}")
        p0 = torch.randn(*shape, generator=g)
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
        p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        kinds = ("coupled", "no_bias_correction", "eps_inside")
        shadow = {k: (p0.clone(), torch.zeros(shape), torch.zeros(shape)) for k in kinds}
        for t in range(1, steps + 1):
            grad = torch.randn(*shape, generator=g) * (0.1 if t % 3 else 2.0)
            ref.grad = grad.clone()
            opt.step()
            shadow = {k: _adamw_variant(*shadow[k][:1], grad, *shadow[k][1:], t, lr, b1, b2, eps, wd, k)
                      for k in kinds}
            try:
                with watching(WATCH_ADAMW, called, fn):
                    p, m, v = fn(p, grad.clone(), m, v, t, lr, b1, b2, eps, wd)
            except Exception as e:
                return _finish("adamw", False, _crash(e, what + f", step t={t}"), s, log)
            msg = _mismatch(what + f"\n  after step t={t} of {steps}", p, ref.detach(), 1e-6, 1e-5, "p")
            if msg:
                names = {"coupled": "the decay is added to the gradient (Adam + L2); AdamW decays p directly: "
                                    "p -= lr * weight_decay * p",
                         "no_bias_correction": "no bias correction: divide m by (1 - beta1^t) and v by (1 - beta2^t)",
                         "eps_inside": "eps is inside the square root; AdamW uses sqrt(v_hat) + eps"}
                hint = _which_variant(p, {names[k]: shadow[k][0] for k in kinds}, 1e-6, 1e-5)
                return _finish("adamw", False, msg + hint, s, log)
    return _finish("adamw", True, f"{trials} random parameters, {steps} steps each (weight decay 0 to 0.5, eps up to "
                   "1e-3): equal to torch.optim.AdamW after every step within 1e-5", s, log,
                   uses_reference=called or _calls_reference(fn, {"AdamW", "adamw", "Adam"}))


WATCH_LR = ("minilm.optim.get_lr", "minilm.train.get_lr")  # defined in optim, re-exported by train


@_check(hints=(
    "A linear warm-up over the first warmup_iters steps, then half a cosine from lr down to min_lr at "
    "lr_decay_iters, then min_lr flat. Invariant: the rate never exceeds lr, is exactly lr at step warmup_iters, and "
    "reaches min_lr exactly at lr_decay_iters.",
    "The warm-up divides it + 1 by warmup_iters + 1, so step 0 already has a small positive rate. The cosine's "
    "progress is the fraction of the way from warmup_iters to lr_decay_iters; its factor goes from 1 to 0 as that "
    "fraction goes from 0 to 1. Most misses are off by one at the two boundaries."))
def lr_schedule(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(it, warmup_iters, lr_decay_iters, lr, min_lr) -> the learning rate at step it (0-based).

    Warm-up: lr * (it + 1) / (warmup_iters + 1) for it < warmup_iters; then cosine from lr down to min_lr:
    min_lr + 0.5 * (1 + cos(pi * ratio)) * (lr - min_lr), ratio = (it - warmup_iters) / (lr_decay_iters -
    warmup_iters); min_lr from lr_decay_iters on. Reference: minilm.optim.get_lr at every step up to
    lr_decay_iters + 20; tolerance 1e-9 * lr.
    """
    from types import SimpleNamespace

    from minilm.optim import get_lr

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        warm = [0, rng.randint(1, 30), rng.randint(50, 100), rng.randint(1, 10)][trial % 4]
        decay = warm + rng.randint(20, 300)
        lr = rng.choice([6e-4, 1e-3, 3e-3, 1e-2])
        min_lr = lr * rng.choice([0.0, 0.1, 0.05])
        t = SimpleNamespace(warmup_iters=warm, lr_decay_iters=decay, lr=lr, min_lr=min_lr)
        what = f"trial {trial}: warmup_iters={warm}, lr_decay_iters={decay}, lr={lr:g}, min_lr={min_lr:g}"
        for it in range(decay + 20):
            expected = get_lr(it, t)
            try:
                with watching(WATCH_LR, called, fn):
                    got = float(fn(it, warm, decay, lr, min_lr))
            except Exception as e:
                return _finish("lr_schedule", False, _crash(e, f"{what}, it={it}"), s, log)
            if not abs(got - expected) <= 1e-9 * lr:
                phase = "warm-up" if it < warm else ("cosine decay" if it < decay else "after lr_decay_iters")
                hint = {"warm-up": "warm-up is linear: lr * (it + 1) / (warmup_iters + 1), so step 0 is not 0",
                        "cosine decay": "the cosine starts at warmup_iters (ratio 0 there) and reaches min_lr, not 0, "
                                        "at lr_decay_iters",
                        "after lr_decay_iters": "from lr_decay_iters on the rate stays at min_lr"}[phase]
                return _finish("lr_schedule", False, f"{what}\n  it={it} ({phase}): expected {expected:.8g}, got "
                               f"{got:.8g}\n  hint: {hint}", s, log)
    return _finish("lr_schedule", True, f"{trials} random schedules (with and without warm-up and min_lr), every step: "
                   "equal to minilm.optim.get_lr", s, log, uses_reference=called or _calls_reference(fn, {"get_lr"}))


WATCH_CLIP = ("torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm",
              "torch.nn.utils.clip_grad.clip_grad_norm_", "torch.nn.utils.clip_grad.clip_grad_norm",
              "torch.nn.utils.clip_grad_value_", "torch.nn.utils.get_total_norm",
              "torch.nn.utils.clip_grads_with_norm_", "torch.nn.utils.clip_grad.get_total_norm",
              "torch.nn.utils.clip_grad.clip_grads_with_norm_")


@_check(hints=(
    "The norm is global: the root of the sum of squares of every entry of every gradient, all parameters together, "
    "not one per parameter. Invariant: afterwards the global norm is at most max_norm (up to the 1e-6), and "
    "gradients already under it are untouched.",
    "Skip parameters whose .grad is None, measure the total first, then scale every gradient in place by max_norm / "
    "(total + 1e-6) only when that factor is below 1, never up. Hand back the norm measured before clipping."))
def clip_grad_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(parameters, max_norm) -> total norm: global-norm gradient clipping, in place.

    total = sqrt(sum of every gradient's squared entries), over all parameters whose .grad is not None; when
    total > max_norm every gradient is multiplied by max_norm / (total + 1e-6) (never scaled up; torch adds 1e-6
    so that a zero norm never divides by zero). Return the norm before clipping. Reference:
    torch.nn.utils.clip_grad_norm_; tolerance 1e-5 relative on the norm, 1e-7 + 1e-5 relative on the gradients.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        k = _randint(g, 1, 6)
        params = [torch.nn.Parameter(torch.randn(_randint(g, 1, 5), _randint(g, 1, 7), generator=g)) for _ in range(k)]
        for i, p in enumerate(params):
            if not (i == 1 and trial % 2):  # some parameters have no gradient
                p.grad = torch.randn(p.shape, generator=g) * float(torch.rand(1, generator=g) * 3)
        total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
        max_norm = float(total) * [0.3, 2.0, 0.05, 0.9, 1.5, 0.5][trial % 6]
        refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for r, p in zip(refs, params):
            r.grad = None if p.grad is None else p.grad.clone()
        before = [None if p.grad is None else p.grad.clone() for p in params]
        expected_norm = float(torch.nn.utils.clip_grad_norm_(refs, max_norm))
        what = (f"trial {trial}: {k} parameters ({sum(p.grad is None for p in params)} without .grad), total norm "
                f"{float(total):.4g}, max_norm={max_norm:.4g}")
        try:
            with watching(WATCH_CLIP, called, fn):
                got_norm = float(fn(params, max_norm))
        except Exception as e:
            return _finish("clip_grad_norm", False, _crash(e, what), s, log)
        if not abs(got_norm - expected_norm) <= 1e-5 * expected_norm:
            return _finish("clip_grad_norm", False, f"{what}\n  expected the returned norm {expected_norm:.6g} (before "
                           f"clipping), got {got_norm:.6g}", s, log)
        for i, (p, r, b0) in enumerate(zip(params, refs, before)):
            if r.grad is None:
                continue
            msg = _mismatch(what, p.grad, r.grad, 1e-7, 1e-5, f"param {i} grad")
            if msg:
                per_tensor = b0 * min(1.0, max_norm / float(b0.norm()))
                variants = {"each gradient is clipped by its own norm; scale all of them by max_norm / global norm":
                            per_tensor,
                            "gradients are scaled up when the norm is below max_norm: only ever scale down":
                            b0 * (max_norm / float(total)),
                            "the gradients are not changed": b0}
                return _finish("clip_grad_norm", False, msg + _which_variant(p.grad, variants, 1e-7, 1e-5), s, log)
    return _finish("clip_grad_norm", True, f"{trials} random parameter sets (norms above and below max_norm, some "
                   "without gradients): same norm and gradients as torch.nn.utils.clip_grad_norm_", s, log,
                   uses_reference=called or _calls_reference(
                       fn, {"clip_grad_norm_", "clip_grad_norm", "clip_grad_value_"}))
