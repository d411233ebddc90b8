"""Turning one row of logits into the next token: repetition penalty, temperature, top-k, top-p."""

from __future__ import annotations

import math

import torch


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, vocab_size, eos_id) -> None:
    """Raise ValueError naming the bad generation parameter and its valid range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature is None or not math.isfinite(temperature) or temperature < 0 or 0 < temperature < 1e-3:
        raise ValueError(f"temperature={temperature!r} is out of range: use 0 for greedy decoding or a finite value "
                         ">= 0.001 (smaller ones overflow the logits)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be a positive integer, or 0/None for no top-k filter")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; 1 or None disables nucleus sampling")
    if repetition_penalty is None or not math.isfinite(repetition_penalty) or not 0.01 <= repetition_penalty <= 100:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be in [0.01, 100] (1.0 = no penalty)")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, seen_mask: torch.Tensor | None,
                temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
                gen: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from logits (B, vocab) after the penalty and filters.

    seen (B, S) holds the context the repetition penalty looks at and seen_mask (B, S) which of it is real (left
    padding is not); both may be None when repetition_penalty is 1.
    """
    if repetition_penalty != 1.0:
        # CTRL-style: make every token already in the context less likely, whatever the logit's sign.
        present = torch.zeros_like(logits).scatter_add_(1, seen, seen_mask.to(logits.dtype)) > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(present, penalised, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k likeliest (id, logprob) of each row of logprobs (rows, vocab), likeliest first."""
    if k == 0:
        return [[] for _ in range(logprobs.size(0))]
    values, ids = torch.topk(logprobs, min(k, logprobs.size(-1)), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def sample_token(logits: torch.Tensor, tokens: list[int], temperature: float, top_k: int | None,
                 top_p: float | None, repetition_penalty: float, gen: torch.Generator | None) -> int:
    """One sequence's next token from its logits (1, vocab); tokens is its context (for the penalty)."""
    seen = seen_mask = None
    if repetition_penalty != 1.0:
        seen = torch.tensor([tokens], dtype=torch.long, device=logits.device)
        seen_mask = torch.ones_like(seen, dtype=torch.bool)
    return int(sample_next(logits, seen, seen_mask, temperature, top_k, top_p, repetition_penalty, gen)[0])
