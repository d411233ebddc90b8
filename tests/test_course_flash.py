"""check.flash_attention passes a tiled online-softmax solution, fails each planted bug, and counts SDPA or the
package's tiled attention as the reference; efficient_training.memory counts the bytes tensors hold at once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course import check
from course import solutions as sol
from course.check.flash import _flash_ref
from efficient_training.memory import TensorBytes, peak_bytes


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def ok(r) -> bool:
    return bool(r) and not r.uses_reference


def _tiles(q, k, v, block, causal=True, max_shift=True, rescale_acc=True):
    """The solution's loop with one switch per planted bug (keys in tiles, all queries at once)."""
    b, h, t, d = q.shape
    q = q / math.sqrt(d)
    m = torch.full((b, h, t, 1), float("-inf")) if max_shift else torch.zeros(b, h, t, 1)
    denom, acc = torch.zeros(b, h, t, 1), torch.zeros_like(q)
    rows = torch.arange(t).unsqueeze(1)
    for ks in range(0, t, block):
        s = q @ k[:, :, ks:ks + block].transpose(-2, -1)
        if causal:
            s = s.masked_fill(torch.arange(ks, ks + s.size(-1)) > rows, float("-inf"))
        m_next = torch.maximum(m, s.amax(-1, keepdim=True)) if max_shift else m
        w, shrink = torch.exp(s - m_next), torch.exp(m - m_next)
        denom = denom * shrink + w.sum(-1, keepdim=True)
        acc = (acc * shrink if rescale_acc else acc) + w @ v[:, :, ks:ks + block]
        m = m_next
    return acc / denom


def test_solution_passes():
    for seed in range(3):
        assert ok(check.flash_attention(sol.my_flash_attention, seed=seed))
    assert ok(check.flash_attention(lambda q, k, v, block: _tiles(q, k, v, block), seed=7))


def test_no_running_max_overflows():
    r = check.flash_attention(lambda q, k, v, block: _tiles(q, k, v, block, max_shift=False), seed=0)
    assert not r and "subtract the running max" in r.message and "trial 4" in r.message


def test_old_accumulator_not_rescaled_fails():
    r = check.flash_attention(lambda q, k, v, block: _tiles(q, k, v, block, rescale_acc=False), seed=0)
    assert not r and "accumulated output o is not rescaled" in r.message


def test_not_causal_fails():
    r = check.flash_attention(lambda q, k, v, block: _tiles(q, k, v, block, causal=False), seed=0)
    assert not r and "without the causal mask" in r.message


def test_materialised_scores_fail():
    def naive(q, k, v, block):
        t = q.size(-2)
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(
            ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        return s.softmax(-1) @ v

    r = check.flash_attention(naive, seed=0)
    assert not r and "never all at once" in r.message and "trial 6" in r.message


def test_sdpa_and_the_package_count_as_the_reference():
    import torch._C._nn as nn_builtins
    from torch.nn.functional import scaled_dot_product_attention as sdpa_alias

    for fn in (lambda q, k, v, block: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda q, k, v, block: sdpa_alias(q, k, v, is_causal=True),
               lambda q, k, v, block: nn_builtins.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda q, k, v, block: torch.ops.aten.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda q, k, v, block: _flash_ref(q, k, v, block), _flash_ref, check.reference("flash_attention")):
        r = check.flash_attention(fn, seed=2)
        assert r and r.uses_reference


def test_tensor_bytes_counts_what_is_alive_at_once():
    def together():
        a, b = torch.ones(1000), torch.ones(1000)
        return (a + b).sum()

    def one_by_one():
        return torch.ones(1000).sum() + torch.ones(1000).sum()

    assert peak_bytes(together) >= 3 * 4000 and peak_bytes(one_by_one) < 2 * 4000
    x = torch.randn(64, 64)
    with TensorBytes() as seen:
        y = x.t().contiguous().view(-1)  # a view shares its storage: counted once
    assert seen.largest == 64 * 64 * 4 and seen.now == 64 * 64 * 4 and y.numel() == 4096
    q = torch.randn(1, 2, 256, 16)
    naive = peak_bytes(lambda: F.softmax(q @ q.transpose(-2, -1), -1) @ q)
    tiled = peak_bytes(lambda: sol.my_flash_attention(q, q, q, block=32))
    assert naive >= 2 * 256 * 256 * 4 > 4 * tiled
