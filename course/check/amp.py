"""Self-check for mixed precision: a dynamic loss scaler next to torch.amp.GradScaler."""

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
    _seed,
    watching,
)

# ----------------------------------------------------------------------------- mixed precision


WATCH_SCALER = ("efficient_training.amp.LossScaler.scale", "efficient_training.amp.LossScaler.unscale_",
                "efficient_training.amp.LossScaler.step", "efficient_training.amp.LossScaler.update",
                "efficient_training.amp.LossScaler.get_scale")


@_check(hints=(
    "Multiply the loss by the current scale before backward and divide the gradients by it before the optimizer uses "
    "them; when any gradient holds inf or NaN, skip that optimizer step and shrink the scale. Invariant: a step that "
    "is taken sees exactly the unscaled gradients, and a skipped step leaves the parameters untouched.",
    "Follow GradScaler's bookkeeping: an overflow multiplies the scale by backoff_factor and resets the count of "
    "good steps; growth_interval good steps in a row multiply it by growth_factor and reset the count. Unscale at "
    "most once per step (step() unscales when unscale_ was not called) and look for inf/NaN in every parameter, not "
    "only the first."))
def loss_scaler(scaler_cls: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """scaler_cls(init_scale, growth_factor, backoff_factor, growth_interval): a dynamic loss scaler class.

    It needs GradScaler's interface: scale(loss), unscale_(optimizer), step(optimizer), update(), get_scale().
    The check trains a small MLP under bf16 autocast with your scaler and with torch.amp.GradScaler, injecting inf
    and NaN gradients at random steps (in one parameter only), and compares the scale before every step, which
    steps were skipped, and the final parameters (tolerance 1e-7). The harness is efficient_training.amp's.
    """
    from efficient_training.amp import LossScaler, compare_with_grad_scaler

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        steps = rng.randint(10, 16)
        bad = rng.sample(range(steps), rng.randint(2, 4))
        overflow, nan = tuple(sorted(bad[:-1])), (bad[-1],)
        kw = dict(init_scale=2.0 ** rng.randint(4, 16), growth_interval=rng.randint(2, 4),
                  backoff_factor=rng.choice([0.5, 0.25]))
        what = (f"trial {trial}: {steps} steps, inf gradient at steps {list(overflow)}, NaN at step {nan[0]}, "
                f"init_scale={kw['init_scale']:g}, growth_interval={kw['growth_interval']}, "
                f"backoff_factor={kw['backoff_factor']}")
        try:
            with watching(WATCH_SCALER, called, scaler_cls):
                r = compare_with_grad_scaler(scaler_cls, steps=steps, overflow_steps=overflow, nan_steps=nan,
                                             seed=rng.randrange(10_000), **kw)
        except Exception as e:
            return _finish("loss_scaler", False, _crash(e, what), s, log)
        if r["ok"]:
            continue
        ours, ref = r["ours"], r["torch"]
        if not r["same_skips"]:
            i = next(i for i, (a, b) in enumerate(zip(ours["skipped"], ref["skipped"])) if a != b)
            did = "skipped" if ref["skipped"][i] else "took"
            yours = "skipped" if ours["skipped"][i] else "took"
            cause = "an inf/NaN gradient" if i in overflow + nan else "only finite gradients"
            msg = f"{what}\n  step {i} had {cause}: GradScaler {did} the optimizer step, your scaler {yours} it"
        elif not r["same_scales"]:
            i = next(i for i, (a, b) in enumerate(zip(ours["scales"], ref["scales"])) if a != b)
            msg = (f"{what}\n  scale before step {i}: GradScaler {ref['scales'][i]:g}, yours {ours['scales'][i]:g}"
                   f"\n  GradScaler's scales: {ref['scales'][: i + 1]}"
                   f"\n  yours:               {ours['scales'][: i + 1]}")
        else:
            msg = (f"{what}\n  same scales and skipped steps, but the parameters differ by up to "
                   f"{r['max_param_diff']:.3g} (tolerance 1e-7): are the gradients divided by the scale exactly "
                   "once before optimizer.step()?")
        return _finish("loss_scaler", False, msg, s, log)
    return _finish("loss_scaler", True, f"{trials} scripted runs with injected inf/NaN gradients: same scale sequence, "
                   "same skipped steps and the same parameters as torch.amp.GradScaler", s, log,
                   uses_reference=called or _calls_reference(scaler_cls, {"LossScaler", "GradScaler"},
                                                   (LossScaler, torch.amp.GradScaler)))
