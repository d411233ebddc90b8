"""The self-check of the scaling-law exercise (notebooks/week18/08_scaling): your fit of L(N, D) on known constants.

    from course import check
    check.scaling_fit(my_fit_law)      # my_fit_law(N, D, L) -> {"E", "A", "B", "alpha", "beta"}

Each trial draws fresh constants, makes a 4 x 3 grid of runs from them (N from 1e4 to 1e6, D from 1e5 to 1e6, 0.2%
noise on each loss), and hands the runs to your function and to minilm.scaling.fit_law. Your constants pass when
their predictions stay within 2% of the true law on and beyond the grid (N and D up to 3e6), and they get the
effect of data right: at a fixed N, how much the loss falls from D = 1e5 to D = 3e6, within 10%. A fit that leaves
out the B / D^beta term fails the second test however well it matches the losses it saw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from course.check._harness import Result, _calls_reference, _check, _crash, _finish, _seed, watching

WATCH = ("minilm.scaling.fit_law", "scipy.optimize.curve_fit")

KEYS = ("E", "A", "B", "alpha", "beta")


def _law(p: dict, N, D):
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def _random_truth(rng: np.random.Generator) -> dict:
    """Constants whose two terms both matter on the grid (each 0.5-2 nats at its middle)."""
    alpha, beta = rng.uniform(0.25, 0.45, 2)
    return {"E": float(rng.uniform(1.5, 3.0)), "A": float(rng.uniform(0.5, 2.0) * 1e5 ** alpha),
            "B": float(rng.uniform(0.5, 2.0) * 3e5 ** beta), "alpha": float(alpha), "beta": float(beta)}


def _fmt(p: dict) -> str:
    return ", ".join(f"{k}={p[k]:.4g}" for k in KEYS)


def _data_effect(p: dict, n: float = 1e5) -> float:
    return float(_law(p, n, 1e5) - _law(p, n, 3e6))


def _verdict(got: dict, truth: dict, what: str, expected: dict) -> str | None:
    """None when got predicts like the truth, else what differed."""
    N, D = np.meshgrid(np.geomspace(1e4, 3e6, 5), np.geomspace(1e5, 3e6, 5))
    rel = np.abs(_law(got, N, D) / _law(truth, N, D) - 1)
    i = np.unravel_index(int(np.argmax(rel)), rel.shape)
    head = (f"{what}\n  true constants:  {_fmt(truth)}\n  fit_law found:   {_fmt(expected)}\n"
            f"  yours:           {_fmt(got)}")
    effect, want = _data_effect(got), _data_effect(truth)
    if abs(effect - want) > 0.1 * want:
        hint = (" Your predictions do not change with D: the B / D^beta term is missing, or B or beta went to 0."
                if abs(effect) < 1e-6 else "")
        return (f"{head}\n  at N=1e5, going from D=1e5 to D=3e6 should lower the loss by {want:.3f}; yours lowers "
                f"it by {effect:.3f}.{hint}")
    if rel[i] > 0.02:
        return (f"{head}\n  at N={N[i]:.3g}, D={D[i]:.3g} the law gives {float(_law(truth, N[i], D[i])):.4f}, yours "
                f"{float(_law(got, N[i], D[i])):.4f} ({rel[i]:.1%} off; 2% allowed). Try more starting points, or "
                "fit the log of the loss (log-sum-exp form) with a Huber loss.")
    return None


@_check(hints=(
    "Fit E + A / N^alpha + B / D^beta to the runs as Chinchilla's approach 3 does: minimise a robust loss between "
    "the logs of the predicted and the observed losses. Invariant: your curve reproduces the runs' losses closely, "
    "with E below the smallest observed loss and A, B, alpha, beta positive.",
    "The objective is not convex: optimise log A, log B and log E (so they stay positive) with alpha and beta under "
    "a Huber loss, start from a grid of initial values and keep the best optimum. A single start from a rough guess "
    "often stops in a local minimum."))
def scaling_fit(fn: Callable, trials: int = 2, seed: int | None = None, log: bool = True) -> Result:
    """fn(N, D, L) -> dict of E, A, B, alpha, beta: a fit of L = E + A / N^alpha + B / D^beta to runs.

    Reference: minilm.scaling.fit_law (Chinchilla's approach 3) on the same runs; the verdict compares with the
    true constants the runs were made from.
    """
    from minilm.scaling import fit_law

    s = _seed(seed)
    rng = np.random.default_rng(s)
    N = np.repeat(np.geomspace(1e4, 1e6, 4), 3)
    D = np.tile(np.geomspace(1e5, 1e6, 3), 4)
    called: Counter = Counter()
    for trial in range(trials):
        truth = _random_truth(rng)
        L = _law(truth, N, D) * np.exp(0.002 * rng.standard_normal(N.shape))
        what = f"trial {trial}: 12 runs, N in [1e4, 1e6] (4 sizes), D in [1e5, 1e6] (3 per size), 0.2% noise"
        try:
            with watching(WATCH, called, fn):
                got = fn(N.copy(), D.copy(), L.copy())
        except Exception as e:
            return _finish("scaling_fit", False, _crash(e, what), s, log)
        if not isinstance(got, dict) or any(k not in got for k in KEYS):
            return _finish("scaling_fit", False, f"{what}\n  expected a dict with keys {list(KEYS)}, got "
                           f"{got if not isinstance(got, dict) else sorted(got)}", s, log)
        got = {k: float(got[k]) for k in KEYS}
        if not all(np.isfinite(list(got.values()))):
            return _finish("scaling_fit", False, f"{what}\n  your constants are not all finite: {got}", s, log)
        problem = _verdict(got, truth, what, fit_law(N, D, L))
        if problem:
            return _finish("scaling_fit", False, problem, s, log)
    return _finish("scaling_fit", True, f"{trials} sets of random constants, 12 noisy runs each: your fit predicts "
                   "within 2% of the true law up to N = D = 3e6 and gets the data term's effect within 10%", s, log,
                   uses_reference=called or _calls_reference(fn, {"fit_law", "bootstrap"}))
