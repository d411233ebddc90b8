"""Perplexity of a token stream under any model that maps token ids to next-token logits.

    from metrics.perplexity import perplexity
    fn = lambda ids: model(ids)[0]                     # (B, T) ids -> (B, T, vocab) logits
    r = perplexity(fn, val_ids, window=128, stride=64, byte_count=n_bytes)
    r.nll, r.perplexity, r.tokens, r.bits_per_byte

A model with a context of `window` tokens cannot read the whole stream at once, so the stream is cut
into windows. Window w feeds ids[b : b + window] and predicts ids[b + 1 : b + window + 1], with b = w * stride.
Every token after the first is scored exactly once:
  - stride == window: non-overlapping windows; a token early in a window sees little context.
  - stride < window: sliding windows; each window scores only the tokens no earlier window scored (the
    last `stride` of them), so every token but those in the first window sees at least window - stride
    tokens of context. Smaller strides give lower (better) perplexity and cost window/stride times more.
We add up NLL sums and token counts and divide once at the end (never average per-window averages).
Perplexity = exp(mean NLL). It depends on the tokenizer; bits per byte = NLL sum / (ln 2 * bytes of text)
does not, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(nll)
    tokens: int  # scored tokens (the stream's length minus one)
    bits_per_byte: float | None  # nll_sum / (ln 2 * byte_count), when byte_count was given
    nll_sum: float  # total NLL in nats
    windows: int = 0  # model calls' worth of windows evaluated

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def result_from_sum(nll_sum: float, tokens: int, byte_count: int | None = None, windows: int = 0) -> PerplexityResult:
    """Turn a summed NLL over `tokens` scored tokens into the result fields."""
    nll = nll_sum / tokens
    bpb = nll_sum / (math.log(2) * byte_count) if byte_count else None
    return PerplexityResult(nll, math.exp(nll), tokens, bpb, nll_sum, windows)


def as_token_tensor(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list, numpy array (memmaps too) or tensor of token ids; clear errors else."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach().cpu()
    else:
        arr = np.asarray(token_ids)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(f"token_ids must be integers, got dtype {arr.dtype}")
        ids = torch.from_numpy(arr.astype(np.int64))
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be one flat stream (1-D), got shape {tuple(ids.shape)}; "
                         "concatenate documents with an end-of-text token between them")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be integers, got {ids.dtype}")
    if ids.numel() < 2:
        raise ValueError(f"token_ids holds {ids.numel()} token(s); perplexity needs at least 2 "
                         "(the first token is context, the rest are scored)")
    if int(ids.min()) < 0:
        raise ValueError(f"token_ids holds a negative id ({int(ids.min())})")
    return ids.long()


def plan_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, skip) per window: inputs ids[begin:end], targets ids[begin+1:end+1], first `skip` unscored."""
    out, begin, scored_to = [], 0, 0  # scored_to: highest target index scored so far
    while True:
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, max(0, scored_to - begin)))
        scored_to = end
        if end == n_tokens - 1:
            return out
        begin += stride


def _logits(model_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    out = model_fn(x)
    if isinstance(out, tuple):  # GPT.forward returns (logits, loss)
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model_fn must map ids {tuple(x.shape)} to logits (batch, time, vocab) "
                         f"= ({x.shape[0]}, {x.shape[1]}, V); it returned {shape}")
    return out


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position as float64 (on the CPU for MPS logits): logsumexp(logits) - logit of the target.

    Computed in float32 (float64 if the logits are float64): exact to ~1e-7 relative, and a third of the
    cost of a float64 softmax over a large vocabulary.
    """
    lf = logits if logits.dtype == torch.float64 else logits.float()
    picked = lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(lf, dim=-1) - picked
    if nll.device.type == "mps":  # MPS has no float64: the (small) per-token result goes to the CPU first
        nll = nll.cpu()
    return nll.double()


@torch.no_grad()
def perplexity(model_fn: Callable[[torch.Tensor], torch.Tensor], token_ids, window: int, stride: int | None = None,
               *, byte_count: int | None = None, batch_size: int = 1, device: str | torch.device = "cpu",
               progress: bool = False) -> PerplexityResult:
    """Perplexity of token_ids under model_fn with windows of `window` input tokens moved by `stride`.

    model_fn maps a (B, T) LongTensor of ids to logits (B, T, vocab); B is 1 unless batch_size > 1.
    stride None means stride = window (non-overlapping windows). byte_count, the UTF-8 bytes of the text
    the tokens encode, adds bits per byte.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer (at most the model's context length)")
    stride = window if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r} must be a positive integer")
    if stride > window:
        raise ValueError(f"stride={stride} is larger than window={window}: tokens between windows would never "
                         "be scored; use stride <= window (stride == window means non-overlapping windows)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if byte_count is not None and byte_count <= 0:
        raise ValueError(f"byte_count={byte_count} must be positive (the UTF-8 bytes of the scored text)")
    ids = as_token_tensor(token_ids)
    plan = plan_windows(len(ids), window, stride)
    # Windows of the same length can share a batch; only the last one can be shorter.
    groups = []
    for w in plan:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="perplexity", unit="win")
    nll_sum, tokens = 0.0, 0
    for group in groups:
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        y = torch.stack([ids[b + 1 : e + 1] for b, e, _ in group]).to(device)
        logits = _logits(model_fn, x)
        if int(y.max()) >= logits.size(-1):
            raise ValueError(f"token id {int(y.max())} is outside the model's vocabulary of {logits.size(-1)}")
        nll = token_nll(logits, y)
        for row, (_, _, skip) in enumerate(group):
            nll_sum += float(nll[row, skip:].sum())
            tokens += nll.size(1) - skip
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return result_from_sum(nll_sum, tokens, byte_count, len(plan))
