"""Self-checks for day 12: the add-k bigram baseline (k fitted on held-out tokens) and a cluster bootstrap interval.

The bigram reference is the package's: metrics.baselines.bigram_nll, the function minilm.data.baseline_losses
counts with (through bigram_perplexity). It scores every token of a split after the first, given the token before
it in the same split, so no pair spans two splits. The package picks k with fit_add_k, which cuts its held-out
part off the end of the training tokens itself; the exercise is handed the held-out tokens as their own split, so
the check runs the same grid search over bigram_nll on (train, heldout) here.

The bootstrap reference is metrics.bootstrap.bootstrap_mean with clusters (what minilm.evaluate reports). Equal
draws for a given seed would tie the learner to numpy's exact call sequence, so the check compares intervals
statistically: many resamples on strongly clustered data, within a tolerance a per-example bootstrap (too narrow)
or a draw without replacement (no width at all) misses by far.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np

from course.check._harness import Result, _calls_reference, _check, _crash, _finish, _seed, watching

# ----------------------------------------------------------------------------- add-k bigram

WATCH_BIGRAM = ("metrics.baselines.bigram_nll", "metrics.baselines.bigram_perplexity", "metrics.baselines.fit_add_k",
                "metrics.baselines.unigram_nll", "metrics.kneser_ney.kneser_ney_perplexity",
                "minilm.data.baseline_losses")


def _addk_ref(train: np.ndarray, heldout: np.ndarray, ev: np.ndarray, vocab_size: int, ks) -> tuple[float, float]:
    """(best k on heldout, eval loss per token): counts on train, scores each split's own pairs; ties: first k."""
    from metrics.baselines import bigram_nll

    def loss(split: np.ndarray, k: float) -> float:
        return bigram_nll(train, split[:-1], split[1:], vocab_size, k) / (len(split) - 1)

    held = [loss(heldout, k) for k in ks]
    best = ks[int(np.argmin(held))]
    return float(best), loss(ev, best)


def _markov_stream(rng: np.random.Generator, vocab_size: int, n: int, concentration: float) -> np.ndarray:
    """n tokens of a random first-order Markov chain: sparse-ish rows, so add-k's k matters."""
    trans = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    cum = trans.cumsum(1)
    out = np.empty(n, dtype=np.int64)
    out[0] = rng.integers(vocab_size)
    u = rng.random(n)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(cum[out[i - 1]], u[i])), vocab_size - 1)
    return out


def _addk_inputs(rng: np.random.Generator, trial: int):
    """Fresh train/heldout/eval streams; trial 0 is redrawn until the k fitted on eval differs from heldout's."""
    ks = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003]
    for _ in range(50):
        v = int(rng.choice([5, 17, 40, 90]))
        conc = float(rng.choice([0.05, 0.2, 1.0]))
        stream = _markov_stream(rng, v, int(rng.integers(600, 2500)), conc)
        a, b = sorted(rng.choice(np.arange(100, len(stream) - 100), size=2, replace=False))
        if b - a < 20:  # a held-out split of one token has no pair to score (and divides by zero)
            continue
        train, held, ev = stream[:a], stream[a:b], stream[b:]
        if trial == 0:  # eval from another chain: its best k is another one
            ev = _markov_stream(rng, v, int(rng.integers(200, 800)), float(rng.choice([0.05, 3.0])))
        best, _ = _addk_ref(train, held, ev, v, ks)
        on_eval, _ = _addk_ref(train, ev, ev, v, ks)
        if trial != 0 or best != on_eval:
            return train, held, ev, v, ks
    return train, held, ev, v, ks


def _addk_variants(train, held, ev, v, ks) -> dict[str, tuple[float, float]]:
    from metrics.baselines import bigram_nll

    def no_kv(split, k):  # (c(a,b) + k) / (c(a) + k): the k * V is missing
        pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
        ctx = np.bincount(train[:-1], minlength=v)
        return -float(np.mean([math.log((pairs[(a, b)] + k) / (ctx[a] + k)) for a, b in zip(split[:-1], split[1:])]))

    best_on_eval = _addk_ref(train, ev, ev, v, ks)
    spans = np.concatenate([train, held, ev])
    cut = len(train) + len(held)
    best_spanning = ks[int(np.argmin([bigram_nll(train, spans[len(train) - 1:cut - 1], spans[len(train):cut], v, k)
                                      for k in ks]))]
    spanning = bigram_nll(train, spans[cut - 1:-1], spans[cut:], v, best_spanning) / len(ev)
    best_nokv = ks[int(np.argmin([no_kv(held, k) for k in ks]))]
    return {
        "k is chosen by the eval loss: pick it on the held-out split, the eval split only reports": best_on_eval,
        "the denominator lacks k * V: (c(a,b) + k) / (c(a) + k * V) sums to 1 over the V next tokens":
            (best_nokv, no_kv(ev, best_nokv)),
        "you score the first token of a split given the last token of the split before it: score only the pairs "
        "inside each split (len - 1 of them)": (best_spanning, spanning),
    }


@_check(hints=(
    "Count c(a, b) over the adjacent pairs of train and c(a) over the pairs' first tokens; the loss of a split is "
    "the mean over its own len - 1 pairs of -log((c(a,b) + k) / (c(a) + k * V)). Invariant: for each a the V "
    "probabilities sum to 1.",
    "Loop over ks, compute the held-out loss for each, keep the k with the lowest (the first on ties), and only "
    "then score eval with it. A V x V count table filled with an unbuffered add (duplicates accumulate) counts the "
    "pairs for small V, and fancy indexing with the two id arrays looks them up."))
def addk_bigram(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(train_ids, heldout_ids, eval_ids, vocab_size, ks) -> (best_k, eval_loss_nats_per_token).

    P(b | a) = (c(a,b) + k) / (c(a) + k * V), counted on train; k is the entry of ks with the lowest held-out loss
    (the first on ties); a split's loss is the mean -log P over its len - 1 adjacent pairs. Reference:
    metrics.baselines.bigram_nll; best_k must be equal, the loss within 1e-6.
    """
    s = _seed(seed)
    rng = np.random.default_rng(s)
    called = Counter()
    for trial in range(trials):
        train, held, ev, v, ks = _addk_inputs(rng, trial)
        what = (f"trial {trial}: vocab_size={v}, {len(train)} train, {len(held)} held-out, {len(ev)} eval tokens, "
                f"ks={ks}")
        best, loss = _addk_ref(train, held, ev, v, ks)
        try:
            with watching(WATCH_BIGRAM, called, fn):
                got = fn(train.copy(), held.copy(), ev.copy(), v, list(ks))
            got_k, got_loss = float(got[0]), float(got[1])
        except Exception as e:
            return _finish("addk_bigram", False, _crash(e, what), s, log)
        if got_k != best or not abs(got_loss - loss) <= 1e-6:
            msg = f"{what}\n  expected (best_k, eval loss) = ({best:g}, {loss:.7f}), got ({got_k:g}, {got_loss:.7f})"
            for hint, (vk, vl) in _addk_variants(train, held, ev, v, ks).items():
                if vk == got_k and abs(vl - got_loss) <= 1e-6:
                    msg += f"\n  hint: {hint}"
                    break
            return _finish("addk_bigram", False, msg, s, log)
    return _finish("addk_bigram", True, f"{trials} random Markov-chain token streams (vocab 5 to 90): the same k and "
                   "eval loss as metrics.baselines.bigram_nll within 1e-6", s, log,
                   uses_reference=called or _calls_reference(fn, {"bigram_nll", "bigram_perplexity", "fit_add_k",
                                                                  "baseline_losses"}))


# ----------------------------------------------------------------------------- cluster bootstrap

WATCH_BOOTSTRAP = ("metrics.bootstrap.bootstrap_mean", "metrics.bootstrap.bootstrap_corpus",
                   "metrics.bootstrap.bootstrap_difference", "metrics.bootstrap.resample_weights",
                   "metrics.bootstrap.resample_indices", "metrics.completion.aggregate")


def _bootstrap_ref(values, clusters, n_resamples: int, seed: int, alpha: float) -> tuple[float, float]:
    from metrics.bootstrap import bootstrap_mean

    r = bootstrap_mean(values, n_samples=n_resamples, confidence=1 - alpha, seed=seed, clusters=clusters)
    return r["low"], r["high"]


def _clustered(rng: np.random.Generator) -> tuple[list[float], list]:
    """Per-example scores in [0, 1] whose clusters differ a lot (a document is easy or hard as a whole)."""
    n_clusters = int(rng.integers(25, 60))
    values, clusters = [], []
    names = rng.permutation(10 * n_clusters)[:n_clusters]  # ids need not be 0..k-1 nor sorted
    for c in names:
        level, size = rng.beta(0.7, 0.7), int(rng.integers(1, 15))
        values += np.clip(level + 0.08 * rng.standard_normal(size), 0, 1).tolist()
        clusters += [f"doc{c}"] * size
    order = rng.permutation(len(values))  # a cluster's examples need not be adjacent
    return [values[i] for i in order], [clusters[i] for i in order]


@_check(hints=(
    "Draw as many clusters as there are, with replacement; a resample holds every example of each drawn cluster "
    "(twice if drawn twice). Its statistic is the mean over those examples. The interval is the alpha/2 and "
    "1 - alpha/2 percentiles of the resampled means.",
    "Group the values by cluster once: per cluster the sum and the count. Each resample draws n_clusters cluster "
    "indices with replacement from np.random.default_rng(seed); its mean is the drawn sums' total over the drawn "
    "counts' total (not the mean of cluster means). The percentiles at 100 * alpha / 2 and 100 * (1 - alpha / 2) of "
    "the resampled means are (low, high)."))
def bootstrap_ci(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(values, clusters, n_resamples, seed, alpha) -> (low, high): percentile cluster bootstrap of the mean.

    Compared with metrics.bootstrap.bootstrap_mean(values, clusters=clusters, confidence=1 - alpha) at 4000
    resamples (its draws need not be yours): each end within 12% of the reference interval's width (the Monte
    Carlo error is near 2%); the same seed must give the same interval.
    """
    s = _seed(seed)
    rng = np.random.default_rng(s)
    called = Counter()
    for trial in range(trials):
        values, clusters = _clustered(rng)
        alpha = [0.05, 0.1, 0.2][trial % 3]
        n_res, fn_seed = 4000, int(rng.integers(2**31))
        what = (f"trial {trial}: {len(values)} values in {len(set(clusters))} clusters, n_resamples={n_res}, "
                f"alpha={alpha}")
        low, high = _bootstrap_ref(values, clusters, 20000, int(rng.integers(2**31)), alpha)
        try:
            with watching(WATCH_BOOTSTRAP, called, fn):
                got = [tuple(float(x) for x in fn(list(values), list(clusters), n_res, fn_seed, alpha))
                       for _ in range(2)]
        except Exception as e:
            return _finish("bootstrap_ci", False, _crash(e, what), s, log)
        (g_low, g_high), again = got
        if again != (g_low, g_high):
            return _finish("bootstrap_ci", False, f"{what}\n  two calls with seed={fn_seed} gave {got[0]} and "
                           f"{again}: draw from np.random.default_rng(seed)", s, log)
        tol = 0.12 * (high - low)
        if abs(g_low - low) > tol or abs(g_high - high) > tol:
            msg = (f"{what}\n  expected about ({low:.4f}, {high:.4f}) (each end within {tol:.4f}), got "
                   f"({g_low:.4f}, {g_high:.4f})")
            iid_low, iid_high = _bootstrap_ref(values, None, 20000, 1, alpha)
            if g_high - g_low < 1e-12:
                msg += "\n  hint: your interval has no width: draw clusters WITH replacement (a permutation of all "
                msg += "clusters always has the same mean)"
            elif abs(g_high - g_low - (iid_high - iid_low)) < abs(g_high - g_low - (high - low)):
                msg += (f"\n  hint: your interval is as narrow as a per-example bootstrap's ({iid_low:.4f}, "
                        f"{iid_high:.4f}): draw whole clusters, not examples")
            return _finish("bootstrap_ci", False, msg, s, log)
    return _finish("bootstrap_ci", True, f"{trials} clustered data sets (25 to 60 clusters, 1 to 14 examples each): "
                   "both ends within 12% of the interval's width of metrics.bootstrap.bootstrap_mean", s, log,
                   uses_reference=called or _calls_reference(fn, {"bootstrap_mean", "bootstrap_corpus",
                                                                  "resample_weights", "resample_indices"}))
