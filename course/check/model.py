"""Self-checks for the model: the MLP, a block, the whole GPT, and the cross-entropy loss."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _has_config_field,
    _mismatch,
    _model_config,
    _perturbed,
    _randint,
    _seed,
    _which_variant,
    watching,
)
from minilm.config import MODERN

# ----------------------------------------------------------------------------- MLP, block, the whole GPT


class _Holder(torch.nn.Module):
    """Named sub-modules and no forward of its own: the weights a learner's function reads."""

    def __init__(self, **modules):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)


def _mlp_case(kind: str, c: int, bias: bool, g: torch.Generator):
    """(module with c_fc and c_proj, reference function): minilm's MLP when it knows `kind`, else the formula."""
    if kind == "gelu" or _has_config_field("mlp"):
        from minilm.model import MLP

        m = _perturbed(MLP(_model_config(n_embd=c, n_head=1, bias=bias, mlp=kind)), g)
        return m, m
    hidden = 4 * c
    m = _perturbed(_Holder(c_fc=torch.nn.Linear(c, hidden * (2 if kind == "swiglu" else 1), bias=bias),
                           c_proj=torch.nn.Linear(hidden, c, bias=bias)), g)
    if kind == "relu2":
        return m, lambda x: m.c_proj(torch.relu(m.c_fc(x)) ** 2)
    return m, lambda x: m.c_proj(F.silu(m.c_fc(x).chunk(2, dim=-1)[0]) * m.c_fc(x).chunk(2, dim=-1)[1])


WATCH_MLP = ("minilm.model.MLP.forward", "course.check.reference._mlp_formula")


@_check(hints=(
    "The feed-forward layer widens each position with c_fc, applies the nonlinearity and narrows back with c_proj, "
    "every position on its own. Invariant: permuting the positions of x permutes the output the same way.",
    "gelu is the exact erf form, not the tanh approximation; relu2 squares the ReLU; swiglu cuts c_fc's output in "
    "two along the last dim, the first half the gate (through SiLU) and the second the values it multiplies, before "
    "c_proj. Swapping the two halves is the usual mistake."))
def mlp(fn: Callable, kinds: tuple[str, ...] = ("gelu",), trials: int = 3, seed: int | None = None,
        log: bool = True) -> Result:
    """fn(x, mlp, kind) -> y: the feed-forward layer, with mlp's weights mlp.c_fc and mlp.c_proj (nn.Linear).

    kind "gelu": c_proj(gelu(c_fc(x))) with the exact (erf) GELU; "relu2": c_proj(relu(c_fc(x))**2);
    "swiglu": gate, up = c_fc(x).chunk(2, dim=-1); c_proj(silu(gate) * up). Pass kinds=("gelu", "relu2",
    "swiglu") to check all three. Reference: minilm.model.MLP; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for kind in kinds:
        if kind not in ("gelu", "relu2", "swiglu"):
            raise ValueError(f"kind {kind!r} is not one of gelu, relu2, swiglu")
        for trial in range(trials):
            c, bias = _randint(g, 2, 33), trial != 1
            m, ref = _mlp_case(kind, c, bias, g)
            x = torch.randn(_randint(g, 1, 4), _randint(g, 1, 10), c, generator=g)
            what = f"kind={kind!r}, trial {trial}: x of shape {tuple(x.shape)}, bias={bias}"
            with torch.no_grad():
                expected = ref(x)
                try:
                    with watching(WATCH_MLP, called, fn):
                        got = fn(x.clone(), m, kind)
                except Exception as e:
                    return _finish("mlp", False, _crash(e, what), s, log)
                msg = _mismatch(what, got, expected, 1e-5, 1e-4)
                if msg:
                    h = m.c_fc(x)
                    if kind == "gelu":
                        variants = {"you use the tanh approximation of GELU; minilm uses the exact one (erf)":
                                    m.c_proj(F.gelu(h, approximate="tanh")),
                                    "that is ReLU, not GELU": m.c_proj(torch.relu(h)),
                                    "c_proj is not applied": F.gelu(h)}
                    elif kind == "swiglu":
                        a, u = h.chunk(2, dim=-1)
                        variants = {"gate and up are swapped: the first half goes through silu":
                                    m.c_proj(F.silu(u) * a),
                                    "silu is applied to the product": m.c_proj(F.silu(a * u))}
                    elif kind == "relu2":
                        variants = {"the ReLU is not squared": m.c_proj(torch.relu(h)),
                                    "the square comes before the ReLU (negative inputs come back)": m.c_proj(h ** 2)}
                    return _finish("mlp", False, msg + _which_variant(got, variants), s, log)
    return _finish("mlp", True, f"{trials} random layers per kind {list(kinds)}: equal to minilm's MLP within 1e-5",
                   s, log, uses_reference=called or _calls_reference(fn, {"MLP"}))


WATCH_BLOCK = ("minilm.model.Block.forward",)


@_check(hints=(
    "A pre-LayerNorm block normalises before each sublayer and adds the sublayer's output back onto the stream: "
    "attention first, then the MLP, each behind its own LayerNorm. Invariant: output position t depends only on "
    "positions 0..t, and the residual stream itself is never normalised.",
    "The MLP branch reads the stream after the attention residual was added, not the block's input. Use ln_1 before "
    "attention and ln_2 before the MLP with their own eps, and reuse your causal_self_attention and mlp pieces with "
    "the block's weights."))
def block(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, block) -> y: one pre-LayerNorm transformer block with block's weights (a minilm Block, eval mode).

    x = x + attention(ln_1(x)); y = x + mlp(ln_2(x)). Use block.ln_1 / block.ln_2 (LayerNorm weight, bias, eps),
    block.attn (c_attn, n_head, c_proj, as in check.causal_self_attention) and block.mlp (c_fc, c_proj, GELU).
    Reference: block(x); tolerance 1e-4 abs + 1e-4 rel.
    """
    from minilm.model import Block

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        n_head = _randint(g, 1, 4)
        c, bias = n_head * 2 * _randint(g, 1, 6), trial != 1
        blk = _perturbed(Block(_model_config(n_embd=c, n_head=n_head, bias=bias, block_size=32)), g, 0.2)
        x = torch.randn(_randint(g, 1, 3), _randint(g, 1, 16), c, generator=g)
        what = f"trial {trial}: x of shape {tuple(x.shape)}, n_head={n_head}, bias={bias}"
        with torch.no_grad():
            expected = blk(x)
            try:
                with watching(WATCH_BLOCK, called, fn):
                    got = fn(x.clone(), blk)
            except Exception as e:
                return _finish("block", False, _crash(e, what), s, log)
            msg = _mismatch(what, got, expected, 1e-4, 1e-4)
            if msg:
                a = x + blk.attn(blk.ln_1(x))
                variants = {
                    "post-LN: you normalise after adding (x = ln(x + f(x))); GPT-2 normalises the branch input":
                        blk.ln_2(blk.ln_1(x + blk.attn(x)) + blk.mlp(blk.ln_1(x + blk.attn(x)))),
                    "the attention branch has no residual (x + ...)": blk.attn(blk.ln_1(x))
                    + blk.mlp(blk.ln_2(blk.attn(blk.ln_1(x)))),
                    "ln_1 is used before the MLP too; the MLP branch has its own ln_2": a + blk.mlp(blk.ln_1(a)),
                    "the MLP reads the block input x instead of x + attention": a + blk.mlp(blk.ln_2(x)),
                }
                return _finish("block", False, msg + _which_variant(got, variants, 1e-4, 1e-4), s, log)
    return _finish("block", True, f"{trials} random blocks (1-3 heads, with and without bias): equal to minilm's "
                   "Block within 1e-4", s, log, uses_reference=called or _calls_reference(fn, {"Block"}))


# The modern recipe's switches, one setting per extra trial of check.gpt(..., modern=True).
# The first is the presets' recipe (minilm.config.MODERN; zero_init is moot, the check loads random weights).
MODERN_RECIPES = (
    {k: v for k, v in MODERN.items() if k != "zero_init"},
    dict(pos="rope", norm="layernorm", mlp="relu2", qk_norm=False, tie_embeddings=True, bias=True, rope_theta=500.0),
    dict(pos="learned", norm="rmsnorm", mlp="gelu", qk_norm=True, tie_embeddings=True, bias=False),
    dict(pos="rope", norm="layernorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False),  # QK: RMSNorm
)


WATCH_GPT = ("minilm.model.GPT.forward", "minilm.model.Block.forward", "minilm.model.CausalSelfAttention.forward",
             "minilm.model.MLP.forward", "minilm.model.RMSNorm.forward")


def _gpt_trial(g: torch.Generator, trial: int, recipe: dict) -> tuple:
    """(config, a minilm GPT with perturbed weights, idx, targets with some -1, the trial's description)."""
    from minilm.model import GPT

    n_head = _randint(g, 1, 4)
    cfg = _model_config(**{"vocab_size": _randint(g, 20, 90), "block_size": _randint(g, 8, 33),
                           "n_layer": _randint(g, 1, 4), "n_head": n_head, "n_embd": n_head * 2 * _randint(g, 1, 6),
                           "bias": trial != 1, "dropout": 0.0, **recipe})
    ref = _perturbed(GPT(cfg), g, 0.15)
    b, t = _randint(g, 1, 4), _randint(g, 1, cfg.block_size + 1)
    idx = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    drop = torch.rand(b, t, generator=g) < 0.2
    drop.view(-1)[0] = False  # at least one target counts: the mean loss over none is nan, equal to nothing
    targets[drop] = -1
    what = (f"trial {trial}: vocab_size={cfg.vocab_size}, block_size={cfg.block_size}, n_layer={cfg.n_layer}, "
            f"n_head={cfg.n_head}, n_embd={cfg.n_embd}, bias={cfg.bias}"
            + "".join(f", {k}={v!r}" for k, v in recipe.items() if k != "bias")
            + f"; idx of shape {(b, t)}, {int((targets == -1).sum())} targets = -1 (ignored)")
    return cfg, ref, idx, targets, what


def _gpt_variants(ref: torch.nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logits of the usual GPT-2 mistakes, by the hint that names each."""
    tr = ref.transformer
    h = tr.wte(idx)
    for blk in tr.h:
        h = blk(h)
    h2 = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
    for blk in tr.h:
        h2 = blk(h2)
    return {"the position embeddings (transformer.wpe) are not added": ref.lm_head(tr.ln_f(h)),
            "the final LayerNorm (transformer.ln_f) is not applied": ref.lm_head(h2)}


@_check(hints=(
    "Token embeddings plus position embeddings (or RoPE inside attention), the blocks, a final norm and lm_head give "
    "logits at every position; the loss is the mean cross-entropy over targets that are not -1. Invariant: your "
    "parameter names are minilm's, so minilm.model.GPT's state_dict loads strictly and the logits match.",
    "Name the submodules as minilm does (a transformer container holding wte, wpe, the list h of blocks and ln_f; "
    "lm_head beside it) and build only what the config asks for: no wpe with rope, RMSNorm, SwiGLU or relu2, q/k "
    "norms, a tied or separate head. Flatten logits and targets for the loss, ignore -1, give None without targets."))
def gpt(model_cls: Callable, trials: int = 3, modern: bool = False, seed: int | None = None,
        log: bool = True) -> Result:
    """model_cls(config) -> an nn.Module with forward(idx, targets=None) -> (logits, loss or None).

    Its parameter names must be minilm's (transformer.wte/wpe/h.N.ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/
    mlp.c_proj/ln_f, lm_head), so minilm.model.GPT's state_dict loads into it (strict). The check loads random
    weights of a minilm GPT into your model and compares logits (tolerance 1e-4 abs + 1e-4 rel) and the mean
    cross-entropy loss over targets, where targets equal to -1 are ignored (1e-5 rel). The first `trials` models
    are GPT-2 blocks; modern=True adds one per setting in check.MODERN_RECIPES (config.pos "rope" with no wpe,
    config.norm "rmsnorm", config.mlp "swiglu"/"relu2", config.qk_norm with attn.q_norm/k_norm, untied lm_head).
    """
    from minilm.model import GPT

    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    recipes = [{}] * trials + (list(MODERN_RECIPES) if modern and _has_config_field("pos") else [])
    for trial, recipe in enumerate(recipes):
        cfg, ref, idx, targets, what = _gpt_trial(g, trial, recipe)
        b, t = idx.shape
        try:
            mine = model_cls(cfg)
            missing, unexpected = mine.load_state_dict(ref.state_dict(), strict=False)
        except Exception as e:
            return _finish("gpt", False, _crash(e, what), s, log)
        if missing or unexpected:
            return _finish("gpt", False, f"{what}\n  minilm's weights do not load into your model: missing "
                           f"{list(missing)[:6]}, unexpected {list(unexpected)[:6]}; name the modules as minilm does "
                           "(see `GPT(config).state_dict().keys()`)", s, log)
        mine.eval()
        with torch.no_grad():
            exp_logits, exp_loss = ref(idx, targets)
            try:
                with watching(WATCH_GPT, called, model_cls):
                    got_logits, got_loss = mine(idx.clone(), targets.clone())
                    plain = mine(idx.clone())
            except Exception as e:
                return _finish("gpt", False, _crash(e, what), s, log)
            msg = _mismatch(what, got_logits, exp_logits, 1e-4, 1e-4, "logits")
            if msg and recipe:
                return _finish("gpt", False, msg + "\n  hint: the GPT-2 trials passed: look at the switches of this "
                               "one (check.rope, check.rms_norm and check.mlp test the pieces)", s, log)
            if msg:
                return _finish("gpt", False, msg + _which_variant(got_logits, _gpt_variants(ref, idx), 1e-4, 1e-4),
                               s, log)
            if not isinstance(plain, tuple) or len(plain) != 2 or plain[1] is not None:
                return _finish("gpt", False, f"{what}\n  model(idx) without targets must return (logits, None), got "
                               f"{type(plain).__name__}", s, log)
            got_loss = float(got_loss) if isinstance(got_loss, torch.Tensor) and got_loss.numel() == 1 else got_loss
            if not isinstance(got_loss, float) or not abs(got_loss - float(exp_loss)) <= 1e-5 * float(exp_loss):
                lf = exp_logits.view(-1, cfg.vocab_size)
                keep = targets.view(-1) != -1
                all_mean = float(F.cross_entropy(lf[keep], targets.view(-1)[keep], reduction="sum")) / (b * t)
                hint = ""
                if isinstance(got_loss, float) and abs(got_loss - all_mean) <= 1e-5 * all_mean:
                    hint = "\n  hint: you divide by every position; divide by the number of targets that are not -1"
                return _finish("gpt", False, f"{what}\n  expected loss {float(exp_loss):.6f}, got {got_loss}{hint}",
                               s, log)
    return _finish("gpt", True, f"{len(recipes)} random GPTs (1-3 layers; {len(recipes) - trials} with the modern "
                   "switches) with minilm's weights loaded: same logits (1e-4) and loss (1e-5, targets -1 ignored) as "
                   "minilm.model.GPT", s, log,
                   uses_reference=called or _calls_reference(model_cls, {"GPT", "Block", "CausalSelfAttention", "MLP"},
                                                   (GPT,)))

# ----------------------------------------------------------------------------- the loss


WATCH_CROSS_ENTROPY = ("torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss",
                       "torch.nn.functional.log_softmax", "torch.log_softmax", "torch.Tensor.log_softmax",
                       "torch.special.log_softmax", "torch.logsumexp", "torch.Tensor.logsumexp",
                       "torch.nn.CrossEntropyLoss.forward", "torch.nn.NLLLoss.forward",
                       "torch.nn.LogSoftmax.forward")


@_check(hints=(
    "Per row the loss is the log-sum-exp of the logits minus the target's logit; average it over the rows whose "
    "target is not ignore_index. Invariants: uniform logits give ln(V), and adding a constant to a row changes "
    "nothing.",
    "Make the log-sum-exp stable by subtracting each row's max before exp and adding it back afterwards. Pick the "
    "target logits only for the kept rows (an ignored target is not a valid index) and divide by the number of kept "
    "rows, not by N."))
def cross_entropy(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(logits, targets, ignore_index=-100) -> mean cross-entropy, a 0-dim tensor.

    logits (N, V) float32, targets (N,) int64; positions whose target is ignore_index do not count (neither in the
    sum nor in the count). Some trials have logits around 1e4: exp() overflows unless you subtract each row's
    max first. Reference: torch.nn.functional.cross_entropy (in float64); tolerance 1e-5 relative.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        n, v = _randint(g, 2, 60), _randint(g, 2, 200)
        scale, shift = [(1.0, 0.0), (30.0, 0.0), (1e4, 0.0), (3.0, 5e3), (1.0, -2e4), (10.0, 0.0)][trial % 6]
        logits = torch.randn(n, v, generator=g) * scale + shift
        targets = torch.randint(0, v, (n,), generator=g)
        ignore = -100 if trial % 2 else -1
        drop = torch.rand(n, generator=g) < 0.3
        drop[0] = False  # at least one position counts
        targets[drop] = ignore
        what = (f"trial {trial}: logits of shape ({n}, {v}) ~ N({shift:g}, {scale:g}^2), ignore_index={ignore}, "
                f"{int(drop.sum())} of {n} targets ignored")
        expected = F.cross_entropy(logits.double(), targets, ignore_index=ignore)
        try:
            with watching(WATCH_CROSS_ENTROPY, called, fn):
                got = fn(logits.clone(), targets.clone(), ignore_index=ignore)
        except Exception as e:
            return _finish("cross_entropy", False, _crash(e, what) + (
                "\n  hint: an ignored target is not a valid index: mask those positions before gathering"
                if isinstance(e, (IndexError, RuntimeError)) else ""), s, log)
        if not isinstance(got, torch.Tensor):
            got = torch.tensor(float(got))
        msg = _mismatch(what, got.reshape(()), expected.reshape(()), 0.0, 1e-5, "loss")
        if msg:
            keep = ~drop
            per = F.cross_entropy(logits.double(), targets.clamp(min=0), reduction="none")
            variants = {"you divide by all N positions; divide by the number that are not ignored":
                        (per * keep).sum() / n,
                        "the ignored positions are counted (with target 0?)": per.mean()}
            return _finish("cross_entropy", False, msg + _which_variant(got.reshape(()), variants, 0, 1e-5), s, log)
    return _finish("cross_entropy", True, f"{trials} random batches (logits up to 2e4 in size, ignore_index -1 and "
                   "-100): equal to F.cross_entropy within 1e-5", s, log,
                   uses_reference=called or _calls_reference(
                       fn, {"cross_entropy", "log_softmax", "nll_loss", "logsumexp"}))
