"""Every architecture variant generates correctly; the modern pieces equal their references; bad combinations
fail with a ConfigError that says what to change."""

import math

import pytest
import torch

from minilm.config import MODERN, ConfigError, ModelConfig, get_preset, parse_args
from minilm.inference.sampling import sample_next
from minilm.model import GPT, RMSNorm, apply_rope, rope_tables

VARIANTS = {
    "gpt2": {},
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
    "untied": {"tie_embeddings": False},
    "no_bias": {"bias": False},
    "modern": MODERN,
}


def make(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)
    model = GPT(cfg).eval()
    # Random (not init-time) weights, so zero-init projections or unit gains cannot hide a bug.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_greedy_equals_recompute(name):
    model = make(**VARIANTS[name])
    x = torch.randint(0, 97, (3, 5))
    assert torch.equal(model.generate(x, 20, temperature=0), model.generate(x, 20, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_left_padded_batch_equals_single_prompts(name):
    model = make(**VARIANTS[name])
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    for use_cache in (True, False):
        out = model.generate(batch, 12, temperature=0, attention_mask=mask, use_cache=use_cache)
        assert torch.equal(out[0], model.generate(a, 12, temperature=0)[0])
        assert torch.equal(out[1, 4:], model.generate(b, 12, temperature=0)[0])


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_padded_batch_with_repetition_penalty_equals_single_prompts(name):
    # Padding holds id 0 (= <|endoftext|> in our tokenizers); it must not be penalised in the padded row.
    model = make(**VARIANTS[name])
    with torch.no_grad():
        model.lm_head.weight[0].add_(3.0)  # make id 0 a likely pick, so penalising it changes the output
    a, b = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 2))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    kw = dict(temperature=0.8, top_k=20, repetition_penalty=1.8)
    out = model.generate(batch[1:], 15, attention_mask=mask[1:], seed=5, **kw)
    assert torch.equal(out[0, 4:], model.generate(b, 15, seed=5, **kw)[0])


def test_repetition_penalty_ignores_masked_positions():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[0, 0, 2]])  # two padding slots holding id 0, then a real token 2
    mask = torch.tensor([[False, False, True]])
    assert sample_next(logits, seen, mask, 0, None, None, 2.0, None).item() == 0  # 0 was never really seen
    mask_all = torch.ones_like(mask)
    assert sample_next(logits, seen, mask_all, 0, None, None, 2.0, None).item() == 1


def test_rmsnorm_equals_torch():
    torch.manual_seed(1)
    x = torch.randn(4, 9, 48) * 5
    ours, ref = RMSNorm(48), torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(48)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)  # fp32, tolerance 1e-5
    assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_rope_is_a_rotation_by_position():
    # As complex numbers, pair (x_i, x_{i+hd/2}) is multiplied by exp(i * pos * theta^(-2i/hd)).
    torch.manual_seed(2)
    hd, T = 16, 11
    x = torch.randn(2, 3, T, hd)
    cos, sin = rope_tables(hd, T, theta=500.0)
    got = apply_rope(x, cos, sin)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :])
    freqs = 500.0 ** (-torch.arange(0, hd, 2).float() / hd)
    angle = torch.arange(T).float()[:, None] * freqs[None]
    rot = z * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(got, torch.cat([rot.real, rot.imag], dim=-1), atol=1e-5)
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(hd), torch.randn(hd)
    c, s = rope_tables(hd, 40)
    dot = lambda m, n: (apply_rope(q, c[m], s[m]) * apply_rope(k, c[n], s[n])).sum()
    assert torch.allclose(dot(5, 2), dot(30, 27), atol=1e-4)


def test_modern_pieces_are_in_place():
    model = make(**MODERN)
    names = dict(model.named_parameters())
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not any(n.endswith(".bias") for n in names)
    assert "transformer.h.0.attn.q_norm.weight" in names
    assert model.transformer.h[0].mlp.c_fc.out_features == 2 * 64 * math.ceil(8 * 32 / 3 / 64)
    assert not any("rope" in k for k in model.state_dict())  # tables are rebuilt, not stored


def test_zero_init_makes_blocks_identity_at_start():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, **MODERN))
    projections = [w for b in model.transformer.h for w in (b.attn.c_proj.weight, b.mlp.c_proj.weight)]
    assert all(float(w.detach().abs().max()) == 0 for w in projections)
    x = torch.randint(0, 50, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert model.transformer.h[0].mlp.c_proj.weight.grad.abs().sum() > 0  # they still learn


def test_old_gpt2_config_dict_loads_as_gpt2():
    old = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True,
               grad_checkpoint=False)  # a checkpoint written before the architecture fields existed
    cfg = ModelConfig.from_dict(old)
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.tie_embeddings) == ("learned", "layernorm", "gelu", True)
    with pytest.raises(ConfigError, match="newer minilm"):
        ModelConfig.from_dict({**old, "attention_sinks": 4})


@pytest.mark.parametrize("kw,words", [
    ({"pos": "rope", "n_embd": 30, "n_head": 2}, ["even head size", "15"]),
    ({"mlp": "geglu"}, ["mlp='geglu'", "gelu, relu2, swiglu"]),
    ({"norm": "batchnorm"}, ["norm='batchnorm'"]),
    ({"pos": "alibi"}, ["pos='alibi'"]),
])
def test_invalid_combinations_raise_config_error(kw, words):
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=1, **{"n_head": 2, "n_embd": 32, **kw})
    with pytest.raises(ConfigError) as e:
        GPT(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_architecture_fields_from_command_line():
    cfg, _ = parse_args(["--preset=tiny", "--pos=learned", "--mlp=gelu", "--qk_norm=false"], cuda=False)
    assert (cfg.model.pos, cfg.model.mlp, cfg.model.qk_norm) == ("learned", "gelu", False)


def test_mini_lm_stays_near_50m():
    n = GPT(get_preset("mini_lm").model).num_params()
    assert 45e6 <= n <= 55e6, n
