"""Self-check for KV-cache generation over the learner's own model: minilm's tokens, each position run once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import torch

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _model_config,
    _perturbed,
    _randint,
    _seed,
    watching,
)
from course.check.flash import WATCH_FLASH
from course.check.sampling import WATCH_SAMPLING
from minilm.config import MODERN

WATCH_GENERATE = WATCH_FLASH + WATCH_SAMPLING + (
    "minilm.inference.generate", "minilm.inference.engine.generate", "minilm.inference.engine.generate_stream",
    "minilm.inference.engine.Decoder.step", "minilm.inference.compiled.decode_step",
    "minilm.inference.sampling.sample_token", "minilm.model.GPT.forward", "minilm.model.GPT.generate",
    "minilm.model.Block.forward", "minilm.model.CausalSelfAttention.forward", "course.check.generate._generate_ref")
# the two block recipes: GPT-2's (learned positions, LayerNorm with biases, GELU, tied head) and the presets'
RECIPES = ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False, "bias": True,
            "tie_embeddings": True}, {k: v for k, v in MODERN.items() if k != "zero_init"})
TILE = 64  # my_flash_attention's default block: one prompt per recipe is longer, so the prefill spans tiles
SAMPLED = ((0.8, 12, None), (1.1, None, 0.9))  # (temperature, top_k, top_p) of the sampled runs


def _generate_ref(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """minilm's engine on the model's weights: its cache, its decode step and its sampler, drawing from generator."""
    from minilm.inference.engine import Decoder
    from minilm.inference.sampling import sample_token
    from minilm.model import GPT

    ref = GPT(model.config).to(model.lm_head.weight.device)
    ref.load_state_dict(model.state_dict())
    ref.eval()

    seq = SimpleNamespace(tokens=prompt_ids[0].tolist())
    decoder = Decoder(ref, 1)
    decoder.add(seq)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ((_, logits),) = decoder.step()
            seq.tokens.append(sample_token(logits[-1:].float(), seq.tokens, temperature, top_k, top_p, 1.0,
                                           generator))
    return torch.tensor([seq.tokens], dtype=torch.long, device=prompt_ids.device)


def _model(g: torch.Generator, recipe: dict):
    """A minilm GPT with random weights large enough that the greedy token depends on the context."""
    from minilm.model import GPT

    n_head = _randint(g, 1, 4)
    cfg = _model_config(vocab_size=_randint(g, 30, 80), block_size=128, n_layer=_randint(g, 1, 4), n_head=n_head,
                        n_embd=n_head * 2 * _randint(g, 2, 7), dropout=0.0, **recipe)
    return cfg, _perturbed(GPT(cfg), g, 0.3)


def _cases(g: torch.Generator, vocab: int) -> list[tuple]:
    """(prompt (1, P), new tokens, temperature, top_k, top_p, seed): greedy at three lengths, then sampled."""
    lengths = (1, _randint(g, 2, 24), _randint(g, TILE + 1, 100))
    out = [(torch.randint(0, vocab, (1, p), generator=g), _randint(g, 6, 17), 0.0, None, None, None)
           for p in lengths]
    for t, k, p in SAMPLED:
        prompt = torch.randint(0, vocab, (1, _randint(g, 1, 30)), generator=g)
        out.append((prompt, _randint(g, 8, 17), t, k, p, _randint(g, 0, 2**31)))
    return out


def _count_positions(model) -> tuple[list[int], list]:
    """Positions each call of layer 0's attn.c_attn processes (appended to the list), and the hook handles."""
    seen: list[int] = []
    hook = lambda module, args, out: seen.append(int(args[0].shape[1]) if args[0].dim() == 3 else 1)
    return seen, [model.transformer.h[0].attn.c_attn.register_forward_hook(hook)]


def _token_message(what: str, got, expected: torch.Tensor, prompt_len: int, recipe: str) -> str | None:
    """None when got equals expected; else where the tokens part and what that points at."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return (f"{what}\n  expected a LongTensor of shape {tuple(expected.shape)} (the prompt, then the new "
                f"tokens), got {shape}")
    diff = (got.cpu() != expected.cpu()).nonzero()
    if not len(diff):
        return None
    j = int(diff[0, 1])
    if j < prompt_len:
        return f"{what}\n  the output must start with the prompt; position {j} holds {int(got[0, j])}"
    where = ("the first new token comes from the prefill of the prompt: look at the causal mask over the prompt, "
             "positions 0..P-1 and the last row's logits" if j == prompt_len else
             "the prefill's token matches, a decode step's does not: look at the new token's position (the "
             "position embedding or RoPE at its offset, not 0), where its key and value go in the cache, and "
             "which cached columns its query sees (all earlier ones and its own), or at the keys and values the "
             "prefill left in the cache")
    return (f"{what}\n  minilm generated {expected[0, prompt_len:].tolist()}\n  yours           "
            f"{got[0, prompt_len:].tolist()}\n  first difference: new token {j - prompt_len} ({recipe}); {where}")


def _cache_message(what: str, calls: list[int], prompt_len: int, new: int) -> str | None:
    """None when layer 0 ran every position once (P + new - 1, or + 1 for a pass after the last token)."""
    total = sum(calls)
    if prompt_len + new - 1 <= total <= prompt_len + new:
        return None
    if not calls:
        return (f"{what}\n  the check counts the positions layer 0's attn.c_attn module processes and saw none: "
                "call the modules (attn.c_attn(x)), not F.linear on their weights")
    return (f"{what}\n  your layer 0 processed {total} positions in {len(calls)} passes (first passes: "
            f"{calls[:8]}); with a cache every position goes through the model once: the {prompt_len}-token "
            f"prompt, then one position per new token, {prompt_len + new - 1} in all. Recomputing the whole "
            "sequence at each step is generation without a cache")


@_check(hints=(
    "Run the prompt through the model once (the prefill), keeping every layer's keys and values; then each step "
    "feeds only the newest token at its own position and attends over everything kept. Invariant: the tokens "
    "equal a version without a cache, and each position goes through the layers exactly once.",
    "Keep per layer a (B, n_head, block_size, head_dim) buffer for keys and one for values and write positions "
    "start..start+T-1 into them. The new token's position is the number of positions already cached: the "
    "position embedding, or RoPE's angle, starts there, not at 0. Its query sees columns 0..its own position. "
    "Greedy takes the argmax; sampling draws once per step with torch.multinomial(your probs, 1, generator)."))
def generate(fn: Callable, model_cls: Callable | None = None, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator) -> (1, P + max_new_tokens).

    prompt_ids is a (1, P) LongTensor and P + max_new_tokens <= model.config.block_size. temperature 0 is greedy
    (argmax); otherwise each step draws once with torch.multinomial(probs, 1, generator=generator) from the
    distribution after temperature, top-k and top-p, as minilm does. model is model_cls(config) (default
    minilm.model.GPT; pass your MyGPT) holding the weights of a random minilm GPT, one per recipe: GPT-2's and
    minilm.config.MODERN (RoPE, RMSNorm, QK-norm, SwiGLU, untied head). Per recipe: greedy from prompts of 1, a
    few, and more than 64 tokens (longer than a flash tile), then two sampled runs with a seeded generator; the
    tokens must equal minilm's engine's (same seed for the sampled ones), and layer 0's attn.c_attn must see each
    position once: the prompt in the prefill, then one new position per step.
    """
    from minilm.model import GPT

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    called, model_cls = Counter(), model_cls or GPT
    for r, recipe in enumerate(RECIPES):
        cfg, ref = _model(g, recipe)
        name = "GPT-2 recipe" if r == 0 else "modern recipe (rope, rmsnorm, qk_norm, swiglu)"
        try:
            model = model_cls(cfg)
            model.load_state_dict(ref.state_dict())
        except Exception as e:
            return _finish("generate", False, _crash(e, f"{name}: loading minilm's weights into model_cls"), s, log)
        model.eval()
        for prompt, new, t, k, p, draw in _cases(g, cfg.vocab_size):
            what = (f"{name}, n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd}, vocab "
                    f"{cfg.vocab_size}: prompt of {prompt.size(1)} tokens, {new} new, "
                    + ("greedy" if t == 0 else f"temperature={t}, top_k={k}, top_p={p}, generator seeded {draw}"))
            expected = _generate_ref(ref, prompt, new, t, k, p, None if draw is None else
                                     torch.Generator().manual_seed(draw))
            gen = None if draw is None else torch.Generator().manual_seed(draw)
            calls, hooks = _count_positions(model)
            before = sum(called.values())
            try:
                with watching(WATCH_GENERATE, called, fn):
                    got = fn(model, prompt.clone(), new, t, k, p, gen)
            except Exception as e:
                return _finish("generate", False, _crash(e, what), s, log)
            finally:
                for h in hooks:
                    h.remove()
            msg = _token_message(what, got, expected, prompt.size(1), name)
            if not msg and sum(called.values()) == before:  # the engine's own cache is not the learner's to count
                msg = _cache_message(what, calls, prompt.size(1), new)
            if msg:
                return _finish("generate", False, msg, s, log)
    return _finish("generate", True, f"2 random models (GPT-2 and modern recipes) loaded into "
                   f"{getattr(model_cls, '__name__', model_cls)}: greedy tokens from prompts of 1, a few and more "
                   f"than {TILE} tokens and {len(SAMPLED)} seeded sampled runs each equal minilm's engine's, with "
                   "every position run through the model once (the cache was used)", s, log,
                   uses_reference=called or _calls_reference(fn, {"_generate_ref", "Decoder", "sample_next",
                                                                  "sample_token"}))
