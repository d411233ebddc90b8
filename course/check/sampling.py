"""Self-check for the next-token distribution (temperature, top-k, top-p) and its reference filtered_probs."""

from __future__ import annotations

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

# ----------------------------------------------------------------------------- sampling


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The next-token distribution minilm samples from: temperature, then top-k, then top-p (nucleus), (B, vocab)."""
    z = logits / temperature
    if top_k:
        kth = torch.topk(z, min(top_k, z.size(-1)), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))  # ties with the k-th logit stay in
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True, dim=-1)
        p = sorted_z.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p: the one that crosses the threshold stays.
        drop = p.cumsum(dim=-1) - p >= top_p
        z = torch.full_like(z, float("-inf")).scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z.softmax(dim=-1)


WATCH_SAMPLING = ("minilm.inference.sampling.sample_next", "course.check.sampling.filtered_probs",
                  "course.check.filtered_probs")


@_check(hints=(
    "Divide the logits by the temperature, keep the top_k largest, then keep the smallest set of most likely tokens "
    "whose probability reaches top_p; removed tokens get probability 0 and the rest are renormalised. Invariant: "
    "every row sums to 1, and temperature 1 without top_k or top_p is the plain softmax.",
    "Apply the filters in that order, top-p on the distribution after temperature and top-k. For top-p sort in "
    "descending order and keep every token up to and including the one where the running sum first reaches top_p, so "
    "the most likely token always survives; masking logits with -inf before one final softmax gives exact zeros."))
def sampling(fn: Callable, rows: int = 512, seed: int | None = None, log: bool = True) -> Result:
    """fn(logits, temperature, top_k, top_p) -> probs: the distribution a sampler draws the next token from.

    logits is (B, vocab) float32; temperature > 0; top_k None or an int (keep the k largest logits); top_p None
    or a float in (0, 1] (keep the smallest set of most likely tokens whose probability reaches top_p, after
    temperature and top-k). Return (B, vocab) probabilities, zero for removed tokens, rows summing to 1.
    The check draws one token per row from your probabilities with torch.multinomial and from
    minilm.inference.sampling.sample_next with the same random generator: equal distributions pick the same tokens.
    """
    from minilm.inference.sampling import sample_next

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    settings = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.9), (0.9, 20, 0.6), (1.0, 1, None),
                (2.0, None, 0.3)]
    for temperature, top_k, top_p in settings:
        vocab = int(torch.randint(8, 80, (1,), generator=g))
        logits = torch.randn(rows, vocab, generator=g) * 2.5
        what = (f"logits of shape ({rows}, {vocab}) ~ N(0, 2.5^2), temperature={temperature}, top_k={top_k}, "
                f"top_p={top_p}")
        try:
            with watching(WATCH_SAMPLING, called, fn):
                probs = fn(logits.clone(), temperature, top_k, top_p)
        except Exception as e:
            return _finish("sampling", False, _crash(e, what), s, log)
        if not isinstance(probs, torch.Tensor) or probs.shape != logits.shape:
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            return _finish("sampling", False, f"{what}\n  expected probabilities of shape {tuple(logits.shape)}, "
                           f"got {shape}", s, log)
        probs = probs.detach().float()
        sums = probs.sum(dim=-1)
        broken = ~torch.isfinite(probs).all(dim=-1) | (probs < 0).any(dim=-1) | ~((sums - 1).abs() <= 1e-4)
        if bool(broken.any()):
            r = int(broken.nonzero()[0])
            finite = bool(torch.isfinite(probs[r]).all())
            nan = "" if finite else " and holds NaN/inf (everything filtered out, then divided by 0?)"
            return _finish("sampling", False, f"{what}\n  row {r} is not a probability distribution: sum "
                           f"{float(sums[r]):.6g}, min {float(probs[r].min()):.3g}{nan} (expected >= 0, summing "
                           "to 1; did you forget the softmax, or renormalising after the filter? top-p must keep at "
                           "least the most likely token)", s, log)
        draw = int(torch.randint(0, 2**31, (1,), generator=g))
        seen = torch.zeros(rows, 1, dtype=torch.long)
        ref = sample_next(logits.clone(), seen, torch.ones_like(seen, dtype=torch.bool), temperature, top_k, top_p,
                          1.0, torch.Generator().manual_seed(draw))
        yours = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(draw)).squeeze(1)
        bad = (ref != yours).nonzero().flatten()
        if len(bad):
            r = int(bad[0])
            rank = torch.argsort(torch.argsort(logits[r], descending=True))  # 0 = largest logit
            kept = int((probs[r] > 0).sum())
            msg = (f"{what}\n  {len(bad)} of {rows} rows drew a different token with the same random numbers; "
                   f"first: row {r}\n  minilm drew token {int(ref[r])} (logit rank {int(rank[ref[r]])}), your "
                   f"probability for it is {float(probs[r, ref[r]]):.4g}\n  from yours came token {int(yours[r])} "
                   f"(logit rank {int(rank[yours[r]])}); you keep {kept} of {vocab} tokens in that row")
            return _finish("sampling", False, msg, s, log)
    return _finish("sampling", True, f"{len(settings)} settings of temperature/top-k/top-p, {rows} random rows each: "
                   "every draw from your distribution equals minilm.inference.sampling.sample_next's with the same "
                   "generator",
                   s, log,
                   uses_reference=called or _calls_reference(fn, {"sample_next", "filtered_probs"}))
