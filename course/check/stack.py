"""Self-checks for the learner's training stack: AdamW and Muon as optimizers, their parameter groups, batches
from a memmap, checkpoints that resume bit for bit, and the training loop that writes the task-4 run."""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _mismatch,
    _model_config,
    _randint,
    _seed,
    watching,
)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_RTOL = 0.08  # bf16 arithmetic in another order than torch's moves the result by ~4% (Frobenius); wrong
#                 coefficients or a missing step move it by 15% or more

WATCH_ADAMW = ("torch.optim.AdamW.step", "torch.optim.Adam.step", "torch.optim.adamw.adamw", "torch.optim.adam.adam",
               "torch.optim._functional.adamw", "torch.optim._functional.adam")
WATCH_MUON = ("torch.optim.Muon.step", "torch.optim._muon._zeropower_via_newtonschulz", "torch.optim._muon.muon",
              "minilm.optim.newton_schulz", "minilm.optim.Muon.step")
WATCH_GROUPS = ("minilm.optim.build_optimizers", "minilm.optim.hidden_matrices", *WATCH_ADAMW, *WATCH_MUON)
WATCH_BATCH = ("minilm.data.TokenData.get_batch",)
WATCH_CKPT = ("minilm.checkpoint.save_checkpoint", "minilm.checkpoint.load_checkpoint", "minilm.checkpoint.rng_state",
              "minilm.checkpoint.set_rng_state", "minilm.checkpoint.atomic_save", "minilm.loop.checkpoint")
WATCH_TRAIN = ("minilm.train.train", "minilm.loop.train_step", "minilm.loop.run_loop", "minilm.run_setup.set_up",
               "minilm.optim.set_lr",
               "minilm.optim.get_lr", "minilm.model.GPT.forward", "torch.nn.utils.clip_grad_norm_",
               "torch.nn.utils.clip_grad.clip_grad_norm_", "torch.amp.GradScaler.scale", "minilm.data.whole_split_loss",
               *WATCH_GROUPS, *WATCH_BATCH, *WATCH_CKPT)


def _reference_classes() -> tuple:
    from minilm.optim import Muon

    return torch.optim.AdamW, torch.optim.Adam, torch.optim.Muon, Muon


def _grads(params, g: torch.Generator, t: int, skip: int | None = None) -> list:
    """Fresh random gradients, every third step larger; parameter `skip` gets none on odd steps."""
    out = []
    for i, p in enumerate(params):
        out.append(None if i == skip and t % 2 else torch.randn(p.shape, generator=g) * (2.0 if t % 3 == 0 else 0.1))
    return out


def _set_grads(params, grads) -> None:
    for p, gr in zip(params, grads):
        p.grad = None if gr is None else gr.clone()


def _round_trip(state: dict) -> dict:
    """A state dict after torch.save and torch.load(weights_only=True), as a checkpoint would hand it back."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------- AdamW as an optimizer


def _adamw_groups(g: torch.Generator, trial: int):
    shapes = [(_randint(g, 2, 7), _randint(g, 2, 9)), (_randint(g, 2, 9),), (_randint(g, 5, 12), _randint(g, 2, 6))]
    p0 = [torch.randn(*s, generator=g) for s in shapes]
    lr, betas, eps = [1e-2, 3e-3, 0.05][trial % 3], [(0.9, 0.999), (0.8, 0.95), (0.9, 0.98)][trial % 3], 1e-8

    def build(cls, params):
        groups = [{"params": [params[0]], "weight_decay": 0.1},  # a matrix
                  {"params": [params[1]], "weight_decay": 0.0, "lr": lr / 3},  # a gain: no decay, its own LR
                  {"params": [params[2]], "weight_decay": 0.5, "betas": (0.5, 0.9)}]  # other betas
        return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.01)

    what = (f"trial {trial}: 3 groups (a {shapes[0]} matrix with weight_decay 0.1; a {shapes[1]} gain with "
            f"weight_decay 0 and lr {lr / 3:g}; a {shapes[2]} matrix with betas (0.5, 0.9), weight_decay 0.5), "
            f"defaults lr={lr:g} betas={betas} eps={eps:g}")
    return p0, build, what


@_check(hints=(
    "One step per parameter: decay p by lr * weight_decay * p (decoupled), move m and v toward the gradient, "
    "divide them by (1 - beta^t) for the bias correction, step by lr * m_hat / (sqrt(v_hat) + eps). Keep m, v and t "
    "in self.state[p], so state_dict() saves them.",
    "Read every hyperparameter from the param group (group['lr'], group['betas'], ...), not from __init__'s "
    "arguments: groups differ. Skip parameters whose .grad is None. Wrap step in @torch.no_grad()."))
def adamw_optimizer(cls: Callable, trials: int = 2, steps: int = 40, seed: int | None = None,
                    log: bool = True) -> Result:
    """cls(param_groups, lr, betas, eps, weight_decay): an AdamW optimizer (a torch.optim.Optimizer subclass).

    Every group may set its own lr, betas and weight_decay. The check steps cls and torch.optim.AdamW side by
    side for `steps` steps of fresh random gradients over three groups (one parameter has no gradient on odd
    steps), saves cls's state_dict() halfway, loads it (after torch.save / torch.load(weights_only=True)) into a
    new cls on copies of the parameters and goes on with that one. Tolerance 1e-6 + 1e-5 relative, every step.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        p0, build, what = _adamw_groups(g, trial)
        refs = [torch.nn.Parameter(p.clone()) for p in p0]
        mine = [torch.nn.Parameter(p.clone()) for p in p0]
        ref_opt = build(lambda gr, **kw: torch.optim.AdamW(gr, foreach=False, **kw), refs)
        try:
            with watching(WATCH_ADAMW, called, cls):
                opt = build(cls, mine)
        except Exception as e:
            return _finish("adamw_optimizer", False, _crash(e, what + ", building the optimizer"), s, log)
        for t in range(1, steps + 1):
            grads = _grads(refs, g, t, skip=1)
            _set_grads(refs, grads)
            ref_opt.step()
            _set_grads(mine, grads)
            try:
                with watching(WATCH_ADAMW, called, cls):
                    opt.step()
                    if t == steps // 2:  # resume from a saved state into a fresh optimizer
                        state = _round_trip(opt.state_dict())
                        mine = [torch.nn.Parameter(p.detach().clone()) for p in mine]
                        opt = build(cls, mine)
                        opt.load_state_dict(state)
            except Exception as e:
                return _finish("adamw_optimizer", False, _crash(e, f"{what}, step {t}"), s, log)
            for i, (p, r) in enumerate(zip(mine, refs)):
                msg = _mismatch(f"{what}\n  after step {t} of {steps}" + (
                    " (the first step after loading the saved state_dict into a new optimizer)"
                    if t == steps // 2 + 1 else ""), p, r.detach(), 1e-6, 1e-5, f"group {i} param")
                if msg:
                    return _finish("adamw_optimizer", False, msg, s, log)
    return _finish("adamw_optimizer", True, f"{trials} runs of {steps} steps over 3 param groups (own lr, betas, "
                   "weight decay; a parameter without gradient on odd steps), saved and loaded halfway: equal to "
                   "torch.optim.AdamW within 1e-5", s, log,
                   uses_reference=called or _calls_reference(cls, {"AdamW", "Adam", "adamw", "adam"},
                                                             _reference_classes()))


# ----------------------------------------------------------------------------- Muon


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().double() - expected.detach().double()).norm() / expected.detach().double().norm())


@_check(hints=(
    "Newton-Schulz pushes every singular value of the matrix toward 1 without an SVD: scale the matrix so its "
    "norm is at most 1, then repeat X <- a X + (b A + c A^2) X where A is the Gram matrix X X^T. Check: the "
    "result's singular values land between about 0.5 and 1.5.",
    "As torch does: work in bfloat16 on a copy; transpose a tall matrix first (A is then the small Gram matrix) "
    "and back at the end; divide by the Frobenius norm clamped below by eps; torch.addmm with its beta and alpha "
    "arguments does b A + c A A in one call."))
def newton_schulz(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(g, coefficients, steps, eps) -> the orthogonalised matrix: torch.optim.Muon's quintic Newton-Schulz.

    g is a 2-D float32 tensor (wide, tall or square); coefficients (a, b, c) = (3.4445, -4.7750, 2.0315). Reference:
    torch.optim._muon._zeropower_via_newtonschulz (bfloat16), compared in relative Frobenius norm (tolerance 0.08:
    bf16 in another order moves it by ~4%). g itself must not change.
    """
    from torch.optim._muon import _zeropower_via_newtonschulz

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        n = _randint(g, 4, 48)
        shape = [(n, 2 * n), (3 * n, n), (n, n)][trial % 3]
        steps = [5, 5, 5, 3, 5, 4][trial % 6]
        x = torch.randn(*shape, generator=g) * float(10 ** torch.empty(1).uniform_(-3, 1, generator=g))
        expected = _zeropower_via_newtonschulz(x.clone(), NS_COEFFICIENTS, steps, 1e-7).float()
        what = f"trial {trial}: g of shape {tuple(shape)} (norm {float(x.norm()):.3g}), {steps} steps"
        before = x.clone()
        try:
            with watching(WATCH_MUON, called, fn):
                got = fn(x, NS_COEFFICIENTS, steps, 1e-7)
        except Exception as e:
            return _finish("newton_schulz", False, _crash(e, what), s, log)
        msg = _mismatch(what, got.float() if isinstance(got, torch.Tensor) else got, expected, 1e30, 0, "X")
        if msg:
            return _finish("newton_schulz", False, msg, s, log)
        if not torch.equal(x, before):
            return _finish("newton_schulz", False, f"{what}\n  your function changed g in place: work on a copy "
                           "(Muon passes its momentum buffer)", s, log)
        err = _rel(got.float(), expected)
        if not err <= NS_RTOL:
            sv = torch.linalg.svdvals(got.float().double())
            return _finish("newton_schulz", False, f"{what}\n  relative difference from torch's {err:.3f} (tolerance "
                           f"{NS_RTOL}); your singular values span {float(sv.min()):.3f}..{float(sv.max()):.3f}, "
                           "torch's ~0.5..1.5: the coefficients (a, b, c), the update X <- aX + (bA + cA^2)X, "
                           "or the normalisation", s, log)
    return _finish("newton_schulz", True, f"{trials} matrices (wide, tall, square; norms 1e-3 to 10; 3-5 steps): "
                   f"within {NS_RTOL} of torch's Newton-Schulz (relative Frobenius)", s, log,
                   uses_reference=called or _calls_reference(fn, {"_zeropower_via_newtonschulz", "newton_schulz"}))


@_check(hints=(
    "Muon keeps one momentum buffer per matrix (buf <- lerp(buf, grad, 1 - momentum)); with Nesterov the update "
    "is lerp(grad, buf, momentum); orthogonalise it with your Newton-Schulz, decay p by lr * weight_decay * p, "
    "then move p against the update by lr * sqrt(max(1, rows / cols)).",
    "Everything reads the param group (group['lr'], ...). The sqrt(max(1, rows/cols)) factor is torch's "
    "'original' adjust_lr_fn: a tall matrix takes a larger step. Keep the buffer in self.state[p]."))
def muon(cls: Callable, trials: int = 2, steps: int = 30, seed: int | None = None, log: bool = True) -> Result:
    """cls(params, lr, weight_decay, momentum, nesterov): Muon for 2-D matrices, as torch.optim.Muon.

    The check steps cls and torch.optim.Muon (adjust_lr_fn "original") side by side for `steps` steps of random
    gradients on a wide, a tall and a square matrix, moving cls's state through state_dict()/load_state_dict()
    into a new optimizer halfway, and compares how far each matrix moved (relative Frobenius, tolerance 0.08:
    torch orthogonalises in bfloat16).
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        n = _randint(g, 4, 24)
        p0 = [torch.randn(n, 2 * n, generator=g), torch.randn(3 * n, n, generator=g), torch.randn(n, n, generator=g)]
        lr, wd, mom = [(0.02, 0.1, 0.95), (0.05, 0.5, 0.8)][trial % 2]
        what = (f"trial {trial}: matrices {[tuple(p.shape) for p in p0]}, lr={lr:g}, weight_decay={wd:g}, "
                f"momentum={mom:g}, nesterov=True")
        refs = [torch.nn.Parameter(p.clone()) for p in p0]
        mine = [torch.nn.Parameter(p.clone()) for p in p0]
        ref_opt = torch.optim.Muon(refs, lr=lr, weight_decay=wd, momentum=mom, nesterov=True, adjust_lr_fn="original")
        def build(params, lr=lr, wd=wd, mom=mom):
            return cls(params, lr=lr, weight_decay=wd, momentum=mom, nesterov=True)

        try:
            with watching(WATCH_MUON, called, cls):
                opt = build(mine)
        except Exception as e:
            return _finish("muon", False, _crash(e, what + ", building the optimizer"), s, log)
        for t in range(1, steps + 1):
            grads = _grads(refs, g, t)
            _set_grads(refs, grads)
            ref_opt.step()
            _set_grads(mine, grads)
            try:
                with watching(WATCH_MUON, called, cls):
                    opt.step()
                    if t == steps // 2:
                        state = _round_trip(opt.state_dict())
                        mine = [torch.nn.Parameter(p.detach().clone()) for p in mine]
                        opt = build(mine)
                        opt.load_state_dict(state)
            except Exception as e:
                return _finish("muon", False, _crash(e, f"{what}, step {t}"), s, log)
            if t % 5 and t != steps // 2 + 1:
                continue
            for i, (p, r, start) in enumerate(zip(mine, refs, p0)):
                err = _rel(p - start, r - start)
                if not err <= NS_RTOL:
                    return _finish("muon", False, f"{what}\n  after step {t} of {steps}, matrix {i} "
                                   f"{tuple(start.shape)} moved {_rel(p - start, torch.zeros_like(start)):.4g} x its "
                                   f"start, torch's {_rel(r - start, torch.zeros_like(start)):.4g}: relative "
                                   f"difference {err:.3f} (tolerance {NS_RTOL})", s, log)
    return _finish("muon", True, f"{trials} runs of {steps} steps on wide, tall and square matrices, saved and loaded "
                   f"halfway: within {NS_RTOL} of torch.optim.Muon", s, log,
                   uses_reference=called or _calls_reference(cls, {"Muon", "_zeropower_via_newtonschulz",
                                                                   "newton_schulz"}, _reference_classes()))


# ----------------------------------------------------------------------------- which parameter goes where


def _group_models(g: torch.Generator):
    from minilm.model import GPT

    kinds = {"modern, untied head": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False,
                                         tie_embeddings=False),
             "GPT-2 block, tied head, biases": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True,
                                                    tie_embeddings=True)}
    for name, kw in kinds.items():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        yield name, GPT(_model_config(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def _placement(optimizers) -> dict[int, tuple]:
    """id(param) -> (optimizer index, lr, weight_decay, betas or momentum) for every parameter handed out."""
    out: dict[int, tuple] = {}
    for k, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                out.setdefault(id(p), []).append((k, group.get("peak_lr", group["lr"]), group["weight_decay"],
                                                  tuple(group.get("betas", ())) or group.get("momentum")))
    return out


@_check(hints=(
    "Muon takes the hidden matrices: the 2-D weights of the Linear layers inside the blocks (attention and MLP), "
    "not the embeddings (rows are looked up, not multiplied) nor the output head, nor a head tied to the "
    "embedding. AdamW takes the rest: matrices with weight decay, gains and biases (1-D) without.",
    "Walk model.named_modules() for nn.Linear layers whose name is not lm_head and whose weight is not an "
    "nn.Embedding's weight; collect the rest from model.parameters() (it lists a tied weight once). Put "
    "'peak_lr' in every group (my_train schedules from it) and return [muon, adamw]."))
def optimizer_groups(fn: Callable, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, lr, muon_lr, weight_decay, betas, muon_momentum) -> [muon, adamw], as minilm.optim does.

    Every trainable parameter in exactly one group; each group holds "peak_lr" (its peak learning rate) and
    weight_decay; the Muon groups muon_lr and the momentum, the AdamW groups lr and betas. Compared parameter by
    parameter with minilm.optim.build_optimizers(model, optimizer="muon") on a modern and a GPT-2-style model.
    The optimizers must be yours (torch's AdamW/Muon count as the reference).
    """
    from minilm.optim import build_optimizers

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    lr, muon_lr, wd, betas, mom = 3e-3, 0.03, 0.1, (0.9, 0.95), 0.9
    t = SimpleNamespace(optimizer="muon", lr=lr, muon_lr=muon_lr, weight_decay=wd, beta1=betas[0], beta2=betas[1],
                        muon_momentum=mom)
    mine_classes = set()
    for name, model in _group_models(g):
        expected = {k: v[0] for k, v in _placement(build_optimizers(model, t, "cpu")).items()}
        what = (f"a {name} minilm GPT (2 layers), lr={lr:g}, muon_lr={muon_lr:g}, weight_decay={wd:g}, "
                f"betas={betas}, muon_momentum={mom:g}")
        try:
            with watching(WATCH_GROUPS, called, fn):
                opts = list(fn(model, lr, muon_lr, wd, betas, mom))
        except Exception as e:
            return _finish("optimizer_groups", False, _crash(e, what), s, log)
        mine_classes |= {type(o) for o in opts}
        got = _placement(opts)
        names = {id(p): n for n, p in model.named_parameters()}
        kind = ("Muon", "AdamW")
        for pid, n in names.items():
            if pid not in got:
                return _finish("optimizer_groups", False, f"{what}\n  {n} is in no group: every trainable "
                               "parameter must be optimised", s, log)
            if len(got[pid]) > 1:
                return _finish("optimizer_groups", False, f"{what}\n  {n} is in {len(got[pid])} groups (a tied "
                               "weight counted twice?): each parameter goes in exactly one", s, log)
            (k, plr, pwd, hyper), (ek, elr, ewd, ehyper) = got[pid][0], expected[pid]
            if k != ek:
                shape = tuple(dict(model.named_parameters())[n].shape)
                return _finish("optimizer_groups", False, f"{what}\n  {n} {shape} went to optimizer {k} "
                               f"({kind[k] if k < 2 else '?'}); expected {kind[ek]} (return [muon, adamw])", s, log)
            if (plr, pwd, hyper) != (elr, ewd, ehyper):
                return _finish("optimizer_groups", False, f"{what}\n  {n}: your group has peak_lr={plr}, "
                               f"weight_decay={pwd}, {'momentum' if k == 0 else 'betas'}={hyper}; expected "
                               f"peak_lr={elr}, weight_decay={ewd}, {ehyper}", s, log)
    if not called:  # torch's or minilm's optimizer classes handed back count as the reference too
        called = Counter({f"{c.__module__}.{c.__qualname__}": 1 for c in mine_classes
                          if issubclass(c, _reference_classes())})
    return _finish("optimizer_groups", True, "two models (modern untied; GPT-2 with biases and a tied head): every "
                   "parameter in the same optimizer with the same peak LR, weight decay and betas/momentum as "
                   "minilm.optim.build_optimizers", s, log,
                   uses_reference=called or _calls_reference(fn, {"build_optimizers", "hidden_matrices"}))


# ----------------------------------------------------------------------------- batches from a memmap


@_check(hints=(
    "Draw the batch_size start offsets with one rng.integers call over [0, len(tokens) - block_size), as "
    "minilm.data.TokenData.get_batch does; x is the block_size tokens from each start and y the same window shifted "
    "one token later. Invariant: y's row equals x's row moved left by one, plus the next token.",
    "Stack the windows, convert them to int64 (the memmap is uint16 or uint32) and wrap them as tensors without a "
    "copy; on CUDA pin the memory and copy to the device without blocking."))
def get_batch(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(tokens, batch_size, block_size, device, rng) -> (x, y): random windows and their next-token targets.

    tokens is an np.memmap of a train.bin (uint16 or uint32); rng a np.random.Generator. Starts are
    rng.integers(0, len(tokens) - block_size, size=batch_size), as minilm.data.TokenData.get_batch draws them, so
    with the same rng state the batches must be equal: int64 tensors of shape (batch_size, block_size). The check
    draws three batches in a row from each of `trials` memmaps.
    """
    from minilm.data import TokenData

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(trials):
            dtype = ("uint16", "uint32")[trial % 2]
            n, b, t = _randint(g, 40, 400), _randint(g, 1, 6), _randint(g, 2, 24)
            d = Path(tmp) / f"d{trial}"
            d.mkdir()
            vocab = 70000 if dtype == "uint32" else 5000
            np.random.default_rng(s + trial).integers(0, vocab, n).astype(dtype).tofile(d / "train.bin")
            (d / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": dtype}))
            ref = TokenData(d, "train")
            tokens = np.memmap(d / "train.bin", dtype=dtype, mode="r")
            what = f"trial {trial}: a {dtype} memmap of {n} tokens, batch_size={b}, block_size={t}"
            r_ref, r_mine = np.random.default_rng(s + 100 + trial), np.random.default_rng(s + 100 + trial)
            for k in range(3):
                x_ref, y_ref = ref.get_batch(b, t, "cpu", rng=r_ref)
                try:
                    with watching(WATCH_BATCH, called, fn):
                        x, y = fn(tokens, b, t, "cpu", r_mine)
                except Exception as e:
                    return _finish("get_batch", False, _crash(e, what), s, log)
                for name, got, exp in (("x", x, x_ref), ("y", y, y_ref)):
                    if not isinstance(got, torch.Tensor) or got.dtype != torch.int64:
                        return _finish("get_batch", False, f"{what}\n  {name} must be an int64 tensor (embedding "
                                       f"lookups need it), got {getattr(got, 'dtype', type(got).__name__)}", s, log)
                    if not torch.equal(got, exp):
                        hint = ""
                        if name == "y" and torch.equal(got, x_ref):
                            hint = "\n  hint: y equals x: the targets are the next tokens, the window shifted by one"
                        elif got.shape == exp.shape and k == 0:
                            hint = ("\n  hint: with the same rng the starts must be rng.integers(0, len(tokens) - "
                                    "block_size, size=batch_size), drawn once per batch")
                        msg = _mismatch(f"{what}\n  batch {k + 1} of 3", got, exp, 0, 0, name)
                        return _finish("get_batch", False, (msg or f"{what}: {name} differs") + hint, s, log)
    return _finish("get_batch", True, f"{trials} memmaps (uint16 and uint32), three batches each: the same windows "
                   "and shifted targets as minilm.data.TokenData.get_batch", s, log,
                   uses_reference=called or _calls_reference(fn, {"get_batch", "TokenData"}))


# ----------------------------------------------------------------------------- checkpoints that resume exactly


def _ckpt_setup(seed: int):
    from minilm.model import GPT

    torch.manual_seed(seed)
    model = GPT(_model_config(vocab_size=48, block_size=12, n_layer=1, n_head=2, n_embd=16, dropout=0.2))
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    opts = [torch.optim.AdamW(mats, lr=3e-3, weight_decay=0.1), torch.optim.SGD(vecs, lr=0.05, momentum=0.9)]
    return model, opts


def _ckpt_steps(model, opts, data_rng, tokens, steps: int) -> list[float]:
    """Training steps that draw on every random stream: the data rng, torch (dropout), numpy and Python."""
    losses = []
    for _ in range(steps):
        starts = data_rng.integers(0, len(tokens) - 13, size=3)
        x = torch.from_numpy(np.stack([tokens[i:i + 12] for i in starts]))
        y = torch.from_numpy(np.stack([tokens[i + 1:i + 13] for i in starts]))
        _, loss = model(x, y)
        loss = loss * (1 + 0.1 * random.random()) * (1 + 0.1 * float(np.random.rand()))
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _streams() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _what_was_lost(model, opts, data_rng, saved: dict) -> str:
    """Which part of the state the load did not bring back, for the failure message."""
    if any(not torch.equal(p, saved["model"][n]) for n, p in model.state_dict().items()):
        return "the model's weights are not the saved ones"
    for o, st in zip(opts, saved["optimizers"]):
        now = o.state_dict()["state"]
        if len(now) != len(st) or any(not torch.equal(torch.as_tensor(v), torch.as_tensor(st[k][kk]))
                                      for k in now for kk, v in now[k].items()):
            return f"{type(o).__name__}'s state (its moments or momentum buffers) is not the saved one"
    if data_rng.bit_generator.state != saved["data"]:
        return "the data sampler's rng is not where it was: batches after the resume differ"
    py, npy, tt = _streams()
    if not torch.equal(tt, saved["streams"][2]):
        return "torch's RNG state (dropout masks) was not restored"
    if npy[0] != saved["streams"][1][0] or not np.array_equal(npy[1], saved["streams"][1][1]) or \
            npy[2:] != saved["streams"][1][2:]:
        return "numpy's global RNG state was not restored"
    if py != saved["streams"][0]:
        return "Python's random module state was not restored"
    return ""


@_check(hints=(
    "Resuming is exact when every input to the next step is restored: the weights, each optimizer's state_dict(), "
    "the step, every random stream (Python, numpy, torch, CUDA) and the data sampler's position.",
    "Save the states as tensors, lists and dicts (torch.load with weights_only refuses numpy arrays: numpy's "
    "state array becomes a tensor); rng.bit_generator.state is a plain dict. Write to a temp file and os.replace "
    "it. On load, restore the RNG states last."))
def checkpoint_resume(save: Callable, load: Callable, steps: int = 6, seed: int | None = None,
                      log: bool = True) -> Result:
    """save(path, model, optimizers, step, data_rng) and load(path, model, optimizers, data_rng) -> the checkpoint.

    The check trains a tiny GPT (dropout on) with two optimizers for `steps` steps on batches from data_rng, saves,
    scrambles everything (a new model and optimizers, reseeded RNGs, a new data_rng), loads, and trains `steps` more:
    losses and weights must equal an uninterrupted run of 2 x steps bit for bit. The file must load with
    torch.load(weights_only=True) and hold minilm's keys "model", "optimizer" (a list), "step", "rng", "data".
    """
    s = _seed(seed)
    called = Counter()
    tokens = np.random.default_rng(s).integers(0, 48, 400).astype(np.int64)

    def fresh_streams(k: int):
        random.seed(k)
        np.random.seed(k % 2**32)
        return np.random.default_rng(k)

    model, opts = _ckpt_setup(s)
    data_rng = fresh_streams(s)
    expected = _ckpt_steps(model, opts, data_rng, tokens, 2 * steps)
    final = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model, opts = _ckpt_setup(s)
    data_rng = fresh_streams(s)
    _ckpt_steps(model, opts, data_rng, tokens, steps)
    what = f"a 1-layer GPT with dropout 0.2, AdamW + SGD(momentum), {steps} steps, save, load, {steps} more"
    saved = {"model": {n: p.detach().clone() for n, p in model.state_dict().items()},
             "optimizers": [_round_trip(o.state_dict())["state"] for o in opts],
             "data": data_rng.bit_generator.state, "streams": _streams()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        try:
            with watching(WATCH_CKPT, called, save):
                save(path, model, opts, steps, data_rng)
        except Exception as e:
            return _finish("checkpoint_resume", False, _crash(e, what + ", saving"), s, log)
        leftovers = sorted(p.name for p in Path(tmp).iterdir() if p.name != "ckpt.pt")
        try:
            raw = torch.load(path, weights_only=True)
        except Exception as e:
            return _finish("checkpoint_resume", False, f"{what}\n  torch.load({path.name}, weights_only=True) failed "
                           f"({type(e).__name__}: {str(e)[:200]}): store tensors, lists and dicts only", s, log)
        missing = [k for k in ("model", "optimizer", "step", "rng", "data") if k not in raw]
        if missing or not isinstance(raw.get("optimizer"), list) or raw.get("step") != steps:
            return _finish("checkpoint_resume", False, f"{what}\n  the checkpoint lacks {missing or 'nothing'}; "
                           f"'optimizer' must be a list of state dicts and 'step' {steps} (got "
                           f"{type(raw.get('optimizer')).__name__}, {raw.get('step')!r})", s, log)
        model, opts = _ckpt_setup(s + 1)  # other initial weights, empty optimizer states
        data_rng = fresh_streams(s + 7)
        torch.manual_seed(s + 7)
        try:
            with watching(WATCH_CKPT, called, load):
                load(path, model, opts, data_rng)
        except Exception as e:
            return _finish("checkpoint_resume", False, _crash(e, what + ", loading"), s, log)
    lost = _what_was_lost(model, opts, data_rng, saved)
    rest = _ckpt_steps(model, opts, data_rng, tokens, steps)
    if rest != expected[steps:] or any(not torch.equal(p, final[n]) for n, p in model.state_dict().items()):
        k = next((i for i, (a, b) in enumerate(zip(rest, expected[steps:])) if a != b), 0)
        return _finish("checkpoint_resume", False, f"{what}\n  step {steps + k + 1} after the resume: loss "
                       f"{rest[k]!r}, the uninterrupted run's {expected[steps + k]!r}\n  "
                       f"{lost or 'the resumed run drifts'}", s, log)
    if leftovers:
        return _finish("checkpoint_resume", False, f"{what}\n  saving left {leftovers} beside ckpt.pt: write a temp "
                       "file and os.replace it onto the checkpoint", s, log)
    return _finish("checkpoint_resume", True, f"{what}: the {steps} steps after the resume equal the uninterrupted "
                   "run bit for bit (losses and weights); the file loads with weights_only=True", s, log,
                   uses_reference=called or _calls_reference(save, {"save_checkpoint", "atomic_save"})
                   or _calls_reference(load, {"load_checkpoint"}))


# ----------------------------------------------------------------------------- the training loop


def _markov_data_dir(d: Path, seed: int, vocab: int = 32) -> Path:
    """A data dir whose tokens follow a random bigram chain: a model that learns beats the unigram fast."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, vocab, (vocab, 3))  # each token is followed by one of 3
    for split, n in (("train", 20000), ("val", 3000)):
        ids = np.empty(n, dtype=np.uint16)
        ids[0] = 0
        choice = rng.integers(0, 3, n)
        for i in range(1, n):
            ids[i] = nxt[ids[i - 1], choice[i]]
        ids.tofile(d / f"{split}.bin")
    meta = {"vocab_size": vocab, "dtype": "uint16", "eot_id": 0, "tokens": {"train": 20000, "val": 3000},
            "tokenizer": "tokenizer.json"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _loop_args(out: Path, data: Path, **kw) -> dict:
    base = dict(max_iters=30, batch_size=8, grad_accum=2, lr=1e-2, min_lr=1e-3, warmup_iters=5, lr_decay_iters=30,
                grad_clip=1.0, eval_interval=10, eval_iters=2, log_interval=5, seed=3, device="cpu",
                dtype="float32", resume=False)
    return {"data_dir": data, "out_dir": out, **base, **kw}


def _loop_run(fn, model_cls, optimizers_fn, config, out: Path, data: Path, called: Counter, init_seed: int, **kw):
    torch.manual_seed(init_seed)
    model = model_cls(config)
    opts = list(optimizers_fn(model, 1e-2, 0.02, 0.1, (0.9, 0.95), 0.95))
    with watching(WATCH_TRAIN, called, fn):  # class-level patches also catch model_cls's and the optimizers' calls
        return fn(model, opts, **_loop_args(out, data, **kw))


def _read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _loop_problem(out: Path, result: dict, rows: list[dict], ckpt: dict) -> str:
    """What is wrong with a finished run dir (empty: nothing)."""
    from minilm.optim import get_lr

    logged = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if not (out / "config.yaml").is_file():
        return "no config.yaml in the run dir"
    if [r["step"] for r in logged] != list(range(5, 31, 5)) or any(
            k not in r for r in logged for k in ("loss", "lr", "tokens_per_s")):
        return (f"metrics.jsonl's training rows must be logged at steps 5, 10, ..., 30 with step, loss, lr, "
                f"tokens_per_s; got steps {[r['step'] for r in logged]}")
    sched = SimpleNamespace(warmup_iters=5, lr_decay_iters=30, max_iters=30, lr=1e-2, min_lr=1e-3)
    for r in logged:
        if not math.isclose(r["lr"], get_lr(r["step"] - 1, sched), rel_tol=1e-9):
            return (f"metrics.jsonl step {r['step']}: lr {r['lr']!r}, expected {get_lr(r['step'] - 1, sched)!r} (the "
                    "warm-up + cosine rate of the step just taken, 0-based)")
    if [r["step"] for r in evals] != [10, 20, 30] or any(k not in r for r in evals for k in ("train_loss", "val_ppl")):
        return f"evaluation rows (train_loss, val_loss, val_ppl) must come at steps 10, 20, 30; got {evals}"
    if not any("final_val_loss" in r and "bigram_val_loss" in r for r in rows):
        return "metrics.jsonl has no final row with final_val_loss and bigram_val_loss"
    if ckpt.get("step") != 30 or not isinstance(ckpt.get("optimizer"), list):
        return f"ckpt.pt must hold step 30 and a list of optimizer states; got step {ckpt.get('step')!r}"
    extra = ckpt.get("extra", {})
    if extra.get("trainer") != "learner" or "." not in str(extra.get("model_class", "")) or \
            "," not in str(extra.get("optimizer_class", "")):
        return (f"ckpt.pt's extra must say trainer 'learner', model_class '<module>.<qualname>' and optimizer_class "
                f"'<module>.<qualname>,<module>.<qualname>'; got {extra}")
    if not evals[-1]["val_loss"] < math.log(32) - 0.5:
        return (f"the val loss only reached {evals[-1]['val_loss']:.3f} (ln 32 = {math.log(32):.3f}): the loop "
                "barely learns")
    return ""


@_check(hints=(
    "Each step: set every group's lr from your schedule (peak_lr x my_lr(step) / lr), draw grad_accum batches, "
    "backward loss / grad_accum for each, clip, step every optimizer, zero the gradients. Every eval_interval "
    "steps: losses on both splits, a metrics row, a checkpoint. The run dir must read like minilm.train's.",
    "Log rows: {step, loss, lr, tokens_per_s, mfu} every log_interval steps and {step, train_loss, val_loss, "
    "val_ppl} at evals; the final row adds final_val_loss (every val token scored once) and bigram_val_loss "
    "(minilm.data.baseline_losses). The checkpoint: model, optimizer list, step, rng, data, config {model, train}, "
    "meta, extra {trainer: learner, model_class, optimizer_class}. When resuming, load it and go on."))
def train_loop(fn: Callable, model_cls: Callable, optimizers_fn: Callable, seed: int | None = None,
               log: bool = True) -> Result:
    """fn(model, optimizers, data_dir, out_dir, max_iters, batch_size, grad_accum, lr, min_lr, warmup_iters,
    lr_decay_iters, grad_clip, eval_interval, eval_iters, log_interval, seed, device, dtype, resume) -> results.

    The check builds a data dir of bigram-chain tokens, trains model_cls(ModelConfig) (a 1-layer GPT) with
    optimizers_fn(model, lr, muon_lr, weight_decay, betas, muon_momentum) for 30 steps, and reads the run dir:
    metrics.jsonl in minilm.train's format with the schedule's lr, ckpt.pt that minilm.checkpoint.
    model_from_checkpoint loads and whose whole-split val loss (minilm.data.whole_split_loss) equals the final
    row's, extra["trainer"] == "learner". Then it trains 20 steps, resumes to 30 and wants the same weights bit
    for bit.
    """
    from minilm.checkpoint import model_from_checkpoint
    from minilm.data import TokenData, whole_split_loss

    s = _seed(seed)
    called = Counter()
    config = _model_config(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, pos="rope",
                           norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False)
    what = "a 1-layer modern GPT on a 32-token bigram chain, 30 steps of 2 x 8 x 16 tokens"
    with tempfile.TemporaryDirectory() as tmp:
        data = _markov_data_dir(Path(tmp), s)
        out = Path(tmp) / "run"
        try:
            result = _loop_run(fn, model_cls, optimizers_fn, config, out, data, called, s)
        except Exception as e:
            return _finish("train_loop", False, _crash(e, what), s, log)
        try:
            rows, ckpt = _read_rows(out), torch.load(out / "ckpt.pt", weights_only=True)
            model, _ = model_from_checkpoint(out, ema=False)
        except Exception as e:
            return _finish("train_loop", False, f"{what}\n  the run dir does not read as minilm's "
                           f"({type(e).__name__}: {str(e)[:300]})", s, log)
        problem = _loop_problem(out, result, rows, ckpt)
        if problem:
            return _finish("train_loop", False, f"{what}\n  {problem}", s, log)
        val = whole_split_loss(model, TokenData(data, "val").tokens, 16)
        final = next(r for r in rows if "final_val_loss" in r)["final_val_loss"]
        if not abs(val - final) <= 1e-4 * val:
            return _finish("train_loop", False, f"{what}\n  final_val_loss {final:.6f} in metrics.jsonl, but the saved "
                           f"model scores {val:.6f} over the whole val split (non-overlapping block_size windows, "
                           "every token after the first a target once)", s, log)
        part = Path(tmp) / "part"
        try:
            _loop_run(fn, model_cls, optimizers_fn, config, part, data, called, s, max_iters=20)
            _loop_run(fn, model_cls, optimizers_fn, config, part, data, called, s + 1, resume=True)
        except Exception as e:
            return _finish("train_loop", False, _crash(e, what + ", 20 steps then resume=True to 30"), s, log)
        resumed = torch.load(part / "ckpt.pt", weights_only=True)["model"]
        diff = [k for k, v in ckpt["model"].items() if not torch.equal(v, resumed[k])]
        if diff:
            return _finish("train_loop", False, f"{what}\n  20 steps, then resume=True to 30, ends with other weights "
                           f"than 30 steps in one go ({diff[0]} and {len(diff) - 1} more): load the checkpoint "
                           "(model, optimizers, RNG, data position, step) before training", s, log)
    return _finish("train_loop", True, f"{what}: minilm's run-dir format (metrics rows, schedule, ckpt.pt with "
                   f"extra trainer=learner), val loss {val:.3f} over the whole split (ln 32 = {math.log(32):.3f}) "
                   "equal to the final row's, and a resumed run equal to the uninterrupted one bit for bit", s, log,
                   uses_reference=called or _calls_reference(fn, {"train_step", "build_optimizers", "set_lr"})
                   or _calls_reference(model_cls, {"GPT"}, (_gpt_class(),)))


def _gpt_class():
    from minilm.model import GPT

    return GPT
