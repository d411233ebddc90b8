"""Reference answers for the exercises that have no function of their own in the packages.

The other exercises' references are the package functions themselves (metrics.bleu.corpus_bleu,
dataset_curation.bpe.train_bpe, ...). A notebook's exercise cell calls these until the learner replaces the call.
"""

from __future__ import annotations

import torch


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
