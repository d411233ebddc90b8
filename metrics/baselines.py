"""Count-based baselines: unigram and bigram language models with add-k smoothing.

    from metrics.baselines import unigram_perplexity, bigram_perplexity, fit_add_k
    k = fit_add_k(train_ids, vocab_size, order=2)
    bigram_perplexity(train_ids, val_ids, vocab_size, k=k).perplexity

They score the same positions as metrics.perplexity (every token after the first), so the numbers line up
with a transformer's: the gap is what the network buys over counting.

  unigram  P(w)     = (count(w) + k) / (N + k * V)
  bigram   P(w | v) = (count(v w) + k) / (count(v *) + k * V)
Add-k gives unseen words (or pairs) a little probability; without it one unseen token makes perplexity infinite.
"""

from __future__ import annotations

import numpy as np

from metrics.perplexity import PerplexityResult, result_from_sum

K_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def _ids(token_ids, name: str, vocab_size: int, min_len: int) -> np.ndarray:
    arr = np.asarray(token_ids)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise TypeError(f"{name} must be a flat sequence of integer token ids, got dtype {arr.dtype} "
                        f"and shape {arr.shape}")
    if len(arr) < min_len:
        raise ValueError(f"{name} holds {len(arr)} tokens; need at least {min_len}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr


def _check_k(k: float) -> None:
    if not k > 0:
        raise ValueError(f"k={k} must be > 0 (add-k smoothing; try 1 for unigrams, 0.01 for bigrams)")


def unigram_nll(train: np.ndarray, targets: np.ndarray, vocab_size: int, k: float) -> float:
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + k) - np.log(len(train) + k * vocab_size)
    return float(-logp[targets].sum())


def bigram_nll(train: np.ndarray, context: np.ndarray, targets: np.ndarray, vocab_size: int, k: float) -> float:
    # V * V pairs would not fit in memory for a real vocabulary, so pair counts are kept sparse:
    # sorted pair keys v * V + w with their counts, looked up by binary search.
    keys, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    ctx = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
    want = context * vocab_size + targets
    pos = np.searchsorted(keys, want).clip(max=len(keys) - 1)
    pair = np.where(keys[pos] == want, counts[pos], 0).astype(np.float64)
    logp = np.log(pair + k) - np.log(ctx[context] + k * vocab_size)
    return float(-logp.sum())


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, k: float = 1.0,
                       byte_count: int | None = None) -> PerplexityResult:
    """Perplexity of eval_ids[1:] under add-k unigram counts of train_ids."""
    _check_k(k)
    train = _ids(train_ids, "train_ids", vocab_size, 1)
    ev = _ids(eval_ids, "eval_ids", vocab_size, 2)
    return result_from_sum(unigram_nll(train, ev[1:], vocab_size, k), len(ev) - 1, byte_count)


def bigram_perplexity(train_ids, eval_ids, vocab_size: int, k: float = 0.01,
                      byte_count: int | None = None) -> PerplexityResult:
    """Perplexity of eval_ids[1:] (each given the token before it) under add-k bigram counts of train_ids."""
    _check_k(k)
    train = _ids(train_ids, "train_ids", vocab_size, 2)
    ev = _ids(eval_ids, "eval_ids", vocab_size, 2)
    return result_from_sum(bigram_nll(train, ev[:-1], ev[1:], vocab_size, k), len(ev) - 1, byte_count)


def fit_add_k(train_ids, vocab_size: int, order: int, grid=K_GRID, holdout: float = 0.1) -> float:
    """The k in grid with the lowest NLL on the last `holdout` share of train_ids, counted on the rest.

    Tuning on held-out training text keeps the validation data untouched.
    """
    if order not in (1, 2):
        raise ValueError(f"order={order} must be 1 (unigram) or 2 (bigram)")
    train = _ids(train_ids, "train_ids", vocab_size, 20)
    cut = int(len(train) * (1 - holdout))
    fit, held = train[:cut], train[cut - 1 :]
    losses = {}
    for k in grid:
        _check_k(k)
        if order == 1:
            losses[k] = unigram_nll(fit, held[1:], vocab_size, k)
        else:
            losses[k] = bigram_nll(fit, held[:-1], held[1:], vocab_size, k)
    return min(losses, key=losses.get)


def greedy_next_tables(train_ids, vocab_size: int) -> tuple[int, np.ndarray]:
    """Greedy decoding under the add-k models: (unigram's argmax, bigram's argmax after each token).

    Add-k adds the same k to every count, so the most probable next token is the most counted one (the lowest
    id on ties, as np.argmax); after a token never seen as a context every token is equally likely: id 0.
    """
    train = _ids(train_ids, "train_ids", vocab_size, 2)
    uni = int(np.argmax(np.bincount(train, minlength=vocab_size)))
    keys, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    prev, nxt = keys // vocab_size, keys % vocab_size
    order = np.lexsort((nxt, -counts, prev))  # per context: highest count first, then lowest id
    prev, nxt = prev[order], nxt[order]
    first = np.r_[True, prev[1:] != prev[:-1]]
    best = np.zeros(vocab_size, dtype=np.int64)
    best[prev[first]] = nxt[first]
    return uni, best
