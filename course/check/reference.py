"""The package's answer to each exercise, called like the learner's function (check.pick's fallback)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- references, called like the exercises


def _mlp_formula(x: torch.Tensor, mlp, kind: str = "gelu") -> torch.Tensor:
    h = mlp.c_fc(x)
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return mlp.c_proj(F.silu(gate) * up)
    return mlp.c_proj(torch.relu(h).square() if kind == "relu2" else F.gelu(h))


def _accumulate_ref(model, optimizer, micro_batches) -> float:
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for x, y in micro_batches:
        _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
    optimizer.step()
    return sum(losses) / len(losses)


def _overfit_ref(model, x, y, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _optimizer_groups_ref(model, lr, muon_lr, weight_decay, betas, muon_momentum) -> list:
    from types import SimpleNamespace

    from minilm.optim import build_optimizers

    t = SimpleNamespace(optimizer="muon", lr=lr, muon_lr=muon_lr, weight_decay=weight_decay, beta1=betas[0],
                        beta2=betas[1], muon_momentum=muon_momentum)
    return build_optimizers(model, t, "cpu")


def _get_batch_ref(tokens, batch_size, block_size, device, rng):
    from minilm.data import TokenData

    return TokenData.from_tokens(tokens).get_batch(batch_size, block_size, device, rng=rng)


def reference(name: str) -> Callable:
    """The package's answer to exercise `name` (a check's name), called like the learner's function.

    A function comes back marked as the reference (a check handed it logs the pass as the package's); it looks the
    package's function up when called, so a check's run-time watch sees it too. A class comes back as it is.
    """
    fn = _reference_fn(name)
    if isinstance(fn, type):
        return fn

    @functools.wraps(fn)
    def ref(*args, **kwargs):
        return fn(*args, **kwargs)

    ref._course_reference = name
    return ref


def _reference_fn(name: str) -> Callable:
    from types import SimpleNamespace

    import dataset_curation.bpe as bpe
    import dataset_curation.filters as filters
    import dataset_curation.minhash as mh
    import metrics.bleu as bleu
    import metrics.perplexity as ppl
    import metrics.rouge as rouge
    import minilm.model as model
    import minilm.train as train
    # by module path: course.check.attention and .sampling are also the names of checks in the package
    attention, curation, norms, optim, sampling = (importlib.import_module(f"course.check.{m}") for m in (
        "attention", "curation", "norms", "optim", "sampling"))
    baselines = importlib.import_module("course.check.baselines")

    if name == "loss_scaler":
        from efficient_training.amp import LossScaler

        return LossScaler
    table = {
        "minhash": lambda sets, num_perm, seed: mh.minhash_signatures(sets, num_perm=num_perm, seed=seed),
        "lsh_candidates": lambda sig, bands, rows: [tuple(p) for p in mh.lsh_candidate_pairs(sig, bands,
                                                                                               rows).tolist()],
        "clusters": lambda n, pairs: mh.union_find_clusters(n, np.array(list(pairs), dtype=np.int64).reshape(-1, 2)),
        "choose_bands": lambda num_perm, threshold: curation.best_bands(num_perm, threshold),
        "dup_lines": lambda text: filters._dup_fraction([ln.strip() for ln in text.split("\n") if ln.strip()]),
        "bpe": lambda text, num_merges: bpe.train_bpe(text, vocab_size=256 + num_merges + 1).merges,
        "bpe_incremental": lambda text, num_merges: bpe.train_bpe(text, vocab_size=256 + num_merges + 1).merges,
        "bpe_encode": lambda text, merges: bpe.BPETokenizer(merges, special_tokens=()).encode(text),
        "perplexity": lambda model_fn, ids, window, stride: ppl.perplexity(model_fn, ids, window, stride).perplexity,
        "bleu": lambda hyps, refs: bleu.corpus_bleu(hyps, refs, smooth_method="none").score,
        "rouge": lambda p, r: {k: v.fmeasure for k, v in rouge.rouge_pair(p, r, ["rouge1", "rouge2",
                                                                                 "rougeL"]).items()},
        "lr_schedule": lambda it, w, d, lr, min_lr: train.get_lr(it, SimpleNamespace(
            warmup_iters=w, lr_decay_iters=d, lr=lr, min_lr=min_lr)),
        "block": lambda x, blk: blk(x),
        "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "causal_self_attention": lambda x, attn: attn(x),
        "layer_norm": lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
        "rms_norm": lambda x, w, eps: norms._rms_norm_ref(x, w, eps),
        "mlp": _mlp_formula,
        "rope": lambda x, theta: attention._rope_ref(x, theta),
        "cross_entropy": lambda z, t, ignore_index=-100: F.cross_entropy(z.float(), t, ignore_index=ignore_index),
        "adamw": lambda *a: optim._adamw_variant(*a, kind="decoupled"),
        "clip_grad_norm": lambda params, max_norm: float(torch.nn.utils.clip_grad_norm_(params, max_norm)),
        "accumulate": _accumulate_ref,
        "overfit": _overfit_ref,
        "sampling": lambda *a: sampling.filtered_probs(*a),
        "newton_schulz": lambda g, coefficients, steps, eps: torch.optim._muon._zeropower_via_newtonschulz(
            g, coefficients, steps, eps),
        "optimizer_groups": _optimizer_groups_ref,
        "get_batch": _get_batch_ref,
        "addk_bigram": lambda tr, he, ev, v, ks: baselines._addk_ref(*(np.asarray(a, dtype=np.int64) for a in (
            tr, he, ev)), v, list(ks)),
        "bootstrap_ci": lambda values, clusters, n, seed, alpha: baselines._bootstrap_ref(values, clusters, n, seed,
                                                                                        alpha),
    }
    if name == "flash_attention":
        from course.check.flash import _flash_ref

        return lambda q, k, v, block=64: _flash_ref(q, k, v, block)
    if name == "gpt":
        return model.GPT
    if name == "generate":
        from course.check.generate import _generate_ref

        return _generate_ref
    if name in ("adamw_optimizer", "muon"):
        return torch.optim.AdamW if name == "adamw_optimizer" else torch.optim.Muon
    if name in ("activation_checkpoint", "ddp_all_reduce"):
        return _memory_ddp_ref(name)
    if name == "decontaminate":
        return _decontaminate_ref
    if name not in table:
        raise KeyError(f"no exercise named {name!r}; the checks are listed by `python -m course checks`")
    return table[name]


def _memory_ddp_ref(name: str) -> Callable:
    """efficient_training's checkpointing and gradient all-reduce, called like the week-17 exercises."""
    import efficient_training.checkpointing as ckpt
    import efficient_training.ddp as ddp

    if name == "activation_checkpoint":
        return lambda fn, *args: ckpt.checkpoint(fn, *args)
    return lambda model, world_size: ddp.all_reduce_gradients(list(model.parameters()), world_size)


def _decontaminate_ref(docs, stats, eval_texts=(), ngram=13, min_fraction=0.1):
    """dataset_curation's stage 8, called like the week-17 exercise."""
    from dataset_curation.dedup import decontaminate

    return decontaminate(docs, stats, eval_texts, ngram, min_fraction)
