"""LossScaler against torch.amp.GradScaler, and the master-weights step against autocast + GradScaler."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficient_training.amp import (
    LossScaler,
    autocast_context,
    compare_with_grad_scaler,
    half_copy,
    master_weights_step,
)
from minilm.config import ModelConfig
from minilm.model import GPT


def test_scaler_matches_grad_scaler_with_injected_overflows():
    r = compare_with_grad_scaler(LossScaler, init_scale=2.0**10, growth_interval=3, steps=14,
                                 overflow_steps=(2, 3, 7), nan_steps=(9,))
    ours, ref = r["ours"], r["torch"]
    assert ours["scales"] == ref["scales"]
    assert ours["skipped"] == ref["skipped"]
    assert [i for i, s in enumerate(ours["skipped"]) if s] == [2, 3, 7, 9]
    assert any(b > a for a, b in zip(ours["scales"], ours["scales"][1:]))  # it also grew after 3 clean steps
    assert r["max_param_diff"] <= 1e-7
    assert ours["state"] == ref["state"]


def test_scaler_matches_with_natural_fp16_overflow_and_odd_backoff():
    # A huge initial scale overflows real fp16 gradients: the scaler must back off step after step.
    r = compare_with_grad_scaler(init_scale=2.0**30, growth_interval=2, backoff_factor=0.3, steps=10,
                                 overflow_steps=(), nan_steps=(), dtype=torch.float16)
    assert r["ours"]["scales"] == r["torch"]["scales"]
    assert r["ours"]["skipped"][:3] == [True, True, True] and not all(r["ours"]["skipped"])
    assert r["ok"]


class NoSkipScaler(LossScaler):
    """Bug: steps even when a gradient overflowed."""

    def step(self, optimizer, *args, **kwargs):
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(id(optimizer))
        return optimizer.step()


class FirstGradOnlyScaler(LossScaler):
    """Bug: looks for inf/NaN in the first gradient only."""

    def unscale_(self, optimizer):
        inv = 1.0 / float(self._scale)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._found_inf[id(optimizer)] = not bool(torch.isfinite(params[0].grad).all())
        for p in params:
            p.grad.mul_(inv)


@pytest.mark.parametrize("buggy", [NoSkipScaler, FirstGradOnlyScaler])
def test_buggy_scalers_are_caught(buggy):
    r = compare_with_grad_scaler(buggy)
    assert not r["ok"]
    assert not r["same_skips"] or not r["same_scales"]


def test_state_dict_is_interchangeable_with_grad_scaler():
    ours = compare_with_grad_scaler()["ours"]["state"]
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(ours)
    assert ref.state_dict() == ours
    back = LossScaler()
    back.load_state_dict(ref.state_dict())
    assert back.state_dict() == ours and back.get_scale() == ours["scale"]


def test_scaler_rejects_bad_arguments_and_misuse():
    with pytest.raises(ValueError, match="init_scale"):
        LossScaler(init_scale=0)
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler()
    s.scale(model(torch.ones(1, 2)).sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        s.unscale_(opt)
    with pytest.raises(RuntimeError, match="without a step"):
        LossScaler().update()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))


def test_master_weights_step_equals_autocast_with_grad_scaler():
    """fp16 half copy + fp32 master weights + LossScaler == fp16 autocast + GradScaler, bit for bit, overflows
    included (autocast also runs these layers in fp16 and casts gradients back to the fp32 weights)."""
    master, ref = _mlp(), _mlp()
    half = half_copy(master, torch.float16)
    opt = torch.optim.AdamW(master.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**22, growth_interval=2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    skips = []
    for _ in range(10):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        loss_fn = lambda m, x=x, y=y: F.cross_entropy(m(x.half()).float(), y)
        _, skipped = master_weights_step(half, master, opt, scaler, loss_fn, grad_clip=1.0)
        skips.append(skipped)
        with torch.autocast("cpu", dtype=torch.float16):
            out = ref(x)
        ref_scaler.scale(F.cross_entropy(out.float(), y)).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert any(skips) and not all(skips)
    for a, b, h in zip(master.parameters(), ref.parameters(), half.parameters()):
        assert (a - b).abs().max() <= 1e-7
        assert h.dtype == torch.float16 and torch.equal(h, a.half())


def test_without_master_weights_small_updates_vanish():
    # A bf16 weight of 1.0 has a spacing of 2^-7 ~ 0.0078: adding -0.001 rounds back to 1.0, every step.
    pure = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    nn.init.ones_(pure.weight)
    opt = torch.optim.SGD(pure.parameters(), lr=1e-3)
    master = nn.Linear(1, 1, bias=False)
    nn.init.ones_(master.weight)
    half = half_copy(master, torch.bfloat16)
    mopt = torch.optim.SGD(master.parameters(), lr=1e-3)
    scaler = LossScaler(enabled=False)  # bf16 has fp32's range: no scaling needed
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    for _ in range(5):
        opt.zero_grad()
        pure(x).float().sum().backward()
        opt.step()
        master_weights_step(half, master, mopt, scaler, lambda m: m(x).float().sum())
    assert pure.weight.item() == 1.0  # five updates lost
    assert abs(master.weight.item() - 0.995) < 1e-6
    assert half.weight.item() < 1.0


def test_bf16_autocast_gpt_on_cpu_trains_close_to_fp32():
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    m32 = GPT(cfg)
    m16 = copy.deepcopy(m32)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    _, loss32 = m32(x, y)
    with autocast_context("cpu", torch.bfloat16):
        logits, loss16 = m16(x, y)
    assert logits.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 2e-2
    opt = torch.optim.AdamW(m16.parameters(), lr=1e-2)
    scaler = LossScaler()
    first = loss16.item()
    for _ in range(5):
        with autocast_context("cpu", torch.bfloat16):
            _, loss = m16(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert loss.item() < first
