"""Interpolated Kneser-Ney n-gram language model, counted with numpy (millions of tokens in seconds).

    from metrics.kneser_ney import KneserNey
    lm = KneserNey(train_ids, vocab_size, order=5)
    lm.perplexity(val_ids, byte_count=n_bytes).bits_per_byte     # scores val_ids[1:], as metrics.perplexity does
    lm.next_probs(context_ids)                                    # (vocab_size,) float64, sums to 1

The model (Kneser & Ney 1995, interpolated as in Chen & Goodman 1998), for order N and history h = w1..wk:

  P_N(w | h) = max(c(h w) - D_N, 0) / c(h .)  +  D_N * T(h .) / c(h .) * P_{N-1}(w | h')
  P_n(w | h) = same with c replaced by the continuation count N1+(. h w), the number of distinct tokens
               seen right before h w (lower orders ask "how many contexts does w complete", not "how often")
  P_1(w)     = max(N1+(. w) - D_1, 0) / N1+(. .)  +  D_1 * T(.) / N1+(. .) / V      (uniform floor: no zeros)

where h' drops the oldest token of h, T(h .) is the number of distinct w with a positive count after h, and
the discount is D_n = n1 / (n1 + 2 n2) from the counts of n-grams seen once and twice. A history never seen
(c(h .) = 0) passes the lower order through unchanged. Histories shorter than N - 1 (the first tokens of a
stream) use the order their length allows. Every distribution sums to 1 over the vocabulary.

Counting: n-grams are numbered order by order. The n-gram starting at position t gets the key
id(its first n-1 tokens) * V + its last token; np.unique over the keys gives the ids of order n and sorts
each history's continuations into one contiguous run, which next_probs reads with two binary searches.
"""

from __future__ import annotations

import numpy as np

from metrics.perplexity import PerplexityResult, result_from_sum


def _as_ids(token_ids, vocab_size: int, name: str) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a flat sequence of integer token ids, got dtype {arr.dtype}, "
                        f"shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr


def _discount(counts: np.ndarray) -> float:
    """D = n1 / (n1 + 2 n2) (Ney, Essen & Kneser 1994), clipped into (0, 1) for degenerate tiny data."""
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    if n1 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 1e-3), 0.999)


class KneserNey:
    """An order-N interpolated Kneser-Ney model of one token stream (see the module docstring)."""

    def __init__(self, train_ids, vocab_size: int, order: int = 5):
        if not isinstance(order, int) or not 1 <= order <= 6:
            raise ValueError(f"order={order!r} must be an integer from 1 to 6 (3 to 5 is usual)")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer")
        ids = _as_ids(train_ids, vocab_size, "train_ids")
        if len(ids) < order + 1:
            raise ValueError(f"train_ids holds {len(ids)} tokens; an order-{order} model needs at least {order + 1}")
        V = self.vocab_size = vocab_size
        self.order, self.train_tokens = order, len(ids)
        self.keys: dict[int, np.ndarray] = {}  # order n >= 2: sorted unique keys history_id * V + word
        self.counts: dict[int, np.ndarray] = {}  # order n: count per n-gram id (raw at the top, continuation below)
        self.ctx_total: dict[int, np.ndarray] = {}  # order n >= 2: per history id, the sum of counts
        self.ctx_types: dict[int, np.ndarray] = {}  # order n >= 2: per history id, continuations with count > 0
        self.discount: dict[int, float] = {}
        gid = ids  # id of the n-gram starting at each position, for the current order n (order 1: the token)
        raw = np.bincount(ids, minlength=V)
        for n in range(1, order + 1):
            if n < order:
                key = gid[: len(ids) - n] * V + ids[n:]
                uniq, first, inverse, cnt_next = np.unique(key, return_index=True, return_inverse=True,
                                                           return_counts=True)
                # The (n+1)-gram first seen at position s ends in the n-gram starting at s + 1: counting those
                # gives each n-gram its number of distinct left neighbours.
                self.counts[n] = np.bincount(gid[first + 1], minlength=V if n == 1 else len(self.keys[n]))
            else:
                self.counts[n] = raw
            self.counts[n] = self.counts[n].astype(np.float64)
            self.discount[n] = _discount(self.counts[n])
            if n >= 2:
                hist = self.keys[n] // V
                size = V if n == 2 else len(self.keys[n - 1])
                self.ctx_total[n] = np.bincount(hist, weights=self.counts[n], minlength=size)
                self.ctx_types[n] = np.bincount(hist, weights=self.counts[n] > 0, minlength=size)
            if n < order:
                self.keys[n + 1], gid, raw = uniq, inverse.reshape(-1).astype(np.int64), cnt_next
        c1, d1 = self.counts[1], self.discount[1]
        self.unigram = (np.maximum(c1 - d1, 0) + d1 * (c1 > 0).sum() / V) / c1.sum()

    def _lookup(self, n: int, hist_ids: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Ids of the order-n n-grams (history id, word); -1 where the history is -1 or the n-gram unseen."""
        keys = self.keys[n]
        want = hist_ids * self.vocab_size + words
        pos = np.searchsorted(keys, want).clip(max=len(keys) - 1)
        return np.where((hist_ids >= 0) & (keys[pos] == want), pos, -1)

    def _interpolate(self, n: int, hist: np.ndarray, gram: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """P_n from P_{n-1} (`lower`) for history ids `hist` and n-gram ids `gram` (-1 = unseen)."""
        h = np.maximum(hist, 0)
        total = np.where(hist >= 0, self.ctx_total[n][h], 0.0)
        types = np.where(hist >= 0, self.ctx_types[n][h], 0.0)
        c = np.where(gram >= 0, self.counts[n][np.maximum(gram, 0)], 0.0)
        d = self.discount[n]
        seen = total > 0
        return np.where(seen, (np.maximum(c - d, 0) + d * types * lower) / np.where(seen, total, 1.0), lower)

    def token_logprobs(self, token_ids) -> np.ndarray:
        """ln P(ids[t] | up to order-1 tokens before t) for t = 1 .. len-1, vectorised over positions."""
        x = _as_ids(token_ids, self.vocab_size, "token_ids")
        T = len(x)
        if T < 2:
            raise ValueError(f"token_ids holds {T} token(s); need at least 2 (the first is only context)")
        # q[n][s]: training id of the n-gram x[s : s + n] (-1 if training never had it).
        q = {1: x}
        for n in range(2, min(self.order, T) + 1):
            q[n] = self._lookup(n, q[n - 1][: T - n + 1], x[n - 1 :])
        t = np.arange(1, T)
        p = self.unigram[x[1:]]
        for n in range(2, min(self.order, T) + 1):
            ok = t >= n - 1  # position t has n - 1 tokens of history
            s = t[ok] - n + 1
            p[ok] = self._interpolate(n, q[n - 1][s], q[n][s], p[ok])
        return np.log(p)

    def _history_id(self, ctx: np.ndarray) -> int:
        """Training id of the n-gram ctx (order len(ctx)), or -1."""
        g = np.array([ctx[0]], dtype=np.int64)
        for k in range(2, len(ctx) + 1):
            g = self._lookup(k, g, ctx[k - 1 : k])
        return int(g[0])

    def next_probs(self, context) -> np.ndarray:
        """P(w | context) for every w in the vocabulary (float64, sums to 1); uses the last order-1 tokens."""
        ctx = _as_ids(context, self.vocab_size, "context")
        ctx = ctx[max(0, len(ctx) - self.order + 1) :] if self.order > 1 else ctx[:0]
        p, V = self.unigram.copy(), self.vocab_size
        for n in range(2, len(ctx) + 2):
            hist = self._history_id(ctx[len(ctx) - n + 1 :])
            if hist < 0 or self.ctx_total[n][hist] <= 0:
                continue  # unseen history: the lower order passes through
            lo, hi = np.searchsorted(self.keys[n], [hist * V, (hist + 1) * V])
            d, total = self.discount[n], self.ctx_total[n][hist]
            p *= d * self.ctx_types[n][hist] / total
            p[self.keys[n][lo:hi] % V] += np.maximum(self.counts[n][lo:hi] - d, 0) / total
        return p

    def perplexity(self, token_ids, byte_count: int | None = None) -> PerplexityResult:
        """Perplexity of token_ids[1:] (every token after the first, as metrics.perplexity scores them)."""
        lp = self.token_logprobs(token_ids)
        return result_from_sum(float(-lp.sum()), len(lp), byte_count)

    def greedy(self, prompt, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """The most probable next token, repeatedly (ties go to the lowest id); stops after eos_id."""
        seq = list(_as_ids(prompt, self.vocab_size, "prompt"))
        out: list[int] = []
        for _ in range(max_new_tokens):
            w = int(np.argmax(self.next_probs(seq)))
            out.append(w)
            seq.append(w)
            if w == eos_id:
                break
        return out
