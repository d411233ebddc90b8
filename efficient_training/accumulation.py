"""Gradient accumulation: one optimizer step over several micro-batches, as if they were one big batch.

Gradients add up in .grad across backward() calls, so k micro-batches give the gradient of the *sum* of their
losses. To get the big batch's gradient, the gradient of the mean loss over all its tokens, each micro-batch's
summed token loss must be divided by the total number of tokens in the whole big batch.

The trap: dividing each micro-batch's *mean* loss by k (the usual `loss / grad_accum`) is only right when every
micro-batch holds the same number of target tokens. With padding, ignored targets (-1) or variable lengths,
tokens in small micro-batches get more weight than tokens in large ones. normalize="micro_batches" reproduces
that bug on purpose, normalize="none" the other classic one (no division at all: a k times larger gradient).

Under DDP every micro-batch but the last runs inside model.no_sync(): gradients only need averaging across
processes once, after the last micro-batch; all-reducing each one would cost k times the communication. The
no_sync context must wrap the forward *and* backward (the hooks fire during backward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NORMALIZE = ("tokens", "micro_batches", "none")


def count_tokens(targets: torch.Tensor) -> int:
    """Target positions that count in the loss (-1 marks an ignored position)."""
    return int((targets != -1).sum())


def summed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the counted tokens (0 for a micro-batch without any, never NaN)."""
    logits, _ = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="sum")


def accumulate_gradients(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         normalize: str = "tokens", sync_last_only: bool = True) -> float:
    """Forward and backward every (x, y) micro-batch, adding into .grad; returns the mean loss per token.

    normalize="tokens" gives exactly the big-batch gradient (mean over every counted token of every micro-batch,
    and of every process when model is a DDP wrapper). With a DDP model (anything with .no_sync()), all micro-
    batches but the last skip the gradient all-reduce when sync_last_only is set.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r} must be one of {NORMALIZE}")
    if not micro_batches:
        raise ValueError("micro_batches is empty: pass at least one (x, y) pair")
    counts = [count_tokens(y) for _, y in micro_batches]
    n_local = sum(counts)
    n_total, world = n_local, 1
    if hasattr(model, "no_sync") and dist.is_available() and dist.is_initialized():
        # DDP averages gradients over processes, so the divisor is the global token count times 1/world.
        world = dist.get_world_size()
        total = torch.tensor([n_local], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(total)
        n_total = int(total.item())
    if n_total == 0:
        raise ValueError("no target tokens in any micro-batch (all targets are -1): nothing to learn from")
    loss_sum = 0.0
    k = len(micro_batches)
    for i, ((x, y), n) in enumerate(zip(micro_batches, counts)):
        skip_sync = sync_last_only and i < k - 1 and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            loss = summed_loss(model, x, y)
            if normalize == "tokens":
                scaled = loss * (world / n_total)
            elif normalize == "micro_batches":
                scaled = loss / max(n, 1) / k  # mean per micro-batch, divided by k: the trap
            else:
                scaled = loss / max(n, 1)  # mean per micro-batch, never divided: k times too large
            scaled.backward()
        loss_sum += loss.item()
    return loss_sum / max(n_local, 1)


def accumulation_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                      micro_batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float = 0.0) -> float:
    """One optimizer step over micro_batches (zero_grad, accumulate, clip, step); returns the mean token loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, micro_batches)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss


def concat_micro_batches(micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The big batch the micro-batches make up: rows right-padded to the longest (inputs pad_id, targets -1).

    Right padding does not change a causal model's outputs at the real positions, so the big batch's loss is
    the mean over exactly the same tokens.
    """
    T = max(x.size(1) for x, _ in micro_batches)
    xs, ys = [], []
    for x, y in micro_batches:
        xs.append(F.pad(x, (0, T - x.size(1)), value=pad_id))
        ys.append(F.pad(y, (0, T - y.size(1)), value=-1))
    return torch.cat(xs), torch.cat(ys)
