"""Our activation checkpointing against the plain model and torch.utils.checkpoint (via minilm's flag)."""

import copy

import pytest
import torch

from efficient_training.checkpointing import activation_memory, apply_checkpointing, checkpoint
from minilm.config import ModelConfig
from minilm.model import GPT

CFG = ModelConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=0.2)


def _grads(model, x, y, seed=123, dtype=None):
    torch.manual_seed(seed)
    model.train()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        _, loss = model(x, y)
    loss.backward()
    # The next random number shows whether checkpointing disturbed the training's RNG stream.
    return [p.grad.clone() for p in model.parameters()], torch.rand(1).item()


def _models():
    torch.manual_seed(0)
    base = GPT(copy.deepcopy(CFG))
    ours = apply_checkpointing(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    ref.config = copy.deepcopy(CFG)
    ref.config.grad_checkpoint = True  # minilm then uses torch.utils.checkpoint per block
    return base, ours, ref


def _batch(seed=1, B=4, T=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (B, T), generator=gen), torch.randint(0, 64, (B, T), generator=gen)


def _max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


def test_gradients_equal_plain_and_torch_checkpoint_with_dropout():
    base, ours, ref = _models()
    x, y = _batch()
    g_base, next_base = _grads(base, x, y)
    g_ours, next_ours = _grads(ours, x, y)
    g_ref, _ = _grads(ref, x, y)
    assert _max_diff(g_base, g_ours) <= 1e-6
    assert _max_diff(g_ref, g_ours) <= 1e-6
    assert next_base == next_ours  # the RNG stream continues exactly as without checkpointing


def test_without_rng_restore_dropout_masks_differ():
    base, _, _ = _models()
    bad = apply_checkpointing(copy.deepcopy(base), preserve_rng_state=False)
    x, y = _batch()
    g_base, _ = _grads(base, x, y)
    g_bad, _ = _grads(bad, x, y)
    assert _max_diff(g_base, g_bad) > 1e-3


def test_recomputation_keeps_bf16_autocast():
    base, ours, _ = _models()
    x, y = _batch()
    g_base, _ = _grads(base, x, y, dtype=torch.bfloat16)
    g_ours, _ = _grads(ours, x, y, dtype=torch.bfloat16)
    assert _max_diff(g_base, g_ours) <= 1e-6


def test_activation_memory_drops_and_grows_with_depth():
    x, y = _batch()
    rows = []
    for n_layer in (2, 4):
        torch.manual_seed(0)
        m = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=n_layer, n_head=2, n_embd=32))
        plain = activation_memory(m, x, y)
        ckpt = activation_memory(apply_checkpointing(m), x, y)
        rows.append((plain, ckpt))
    (p2, c2), (p4, c4) = rows
    assert c2 < p2 and c4 < p4
    per_block_plain, per_block_ckpt = (p4 - p2) / 2, (c4 - c2) / 2
    assert per_block_ckpt == x.numel() * 32 * 4  # one fp32 (B, T, C) input kept per checkpointed block
    assert per_block_plain > 5 * per_block_ckpt


def test_eval_and_generate_unchanged_and_unwrap_restores_keys():
    base, ours, _ = _models()
    x, _ = _batch()
    base.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.equal(base(x)[0], ours(x)[0])
    assert torch.equal(base.generate(x[:1, :4], 5, temperature=0), ours.generate(x[:1, :4], 5, temperature=0))
    assert any(".block." in k for k in ours.state_dict())
    apply_checkpointing(ours, enabled=False)
    assert list(ours.state_dict()) == list(base.state_dict())


def test_misuse_is_reported():
    m = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, grad_checkpoint=True))
    with pytest.raises(ValueError, match="grad_checkpoint"):
        apply_checkpointing(m)
    with pytest.warns(UserWarning, match="requires grad"):
        checkpoint(torch.nn.Linear(2, 2), torch.ones(1, 2))


def test_modern_block_checkpointed_equals_plain_and_torch():
    # RoPE reaches the block as an extra argument: the wrapper must pass it through (training and generation).
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1, pos="rope",
                      norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False)
    torch.manual_seed(0)
    base = GPT(copy.deepcopy(cfg))
    ours = apply_checkpointing(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    ref.config.grad_checkpoint = True
    x, y = _batch()
    g_base, r_base = _grads(base, x, y)
    for other in (ours, ref):
        g, r = _grads(other, x, y)
        assert _max_diff(g_base, g) <= 1e-6 and r == r_base
    base.eval()
    ours.eval()
    assert torch.equal(base.generate(x[:1, :4], 6, temperature=0), ours.generate(x[:1, :4], 6, temperature=0))
