"""Perplexity: exact cases (uniform model, a bigram model with known context), agreement with a direct
full-context computation on a real GPT, and the count-based baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.baselines import bigram_perplexity, fit_add_k, unigram_perplexity
from metrics.perplexity import perplexity, plan_windows
from minilm.config import ModelConfig
from minilm.model import GPT


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than the init so predictions depend strongly on context
        for p in model.parameters():
            p.mul_(4.0)
    return model


def gpt_fn(model):
    return lambda ids: model(ids)[0]


def bigram_table(train: np.ndarray, vocab: int, k: float) -> torch.Tensor:
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (train[:-1], train[1:]), 1)
    return torch.from_numpy(np.log((counts + k) / (counts.sum(1, keepdims=True) + k * vocab)))


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (5, 1), (64, None)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_uniform_logits_give_the_vocab_size(window, stride, dtype, tol):
    ids = torch.randint(0, 37, (101,), generator=torch.Generator().manual_seed(0))
    r = perplexity(lambda x: torch.zeros(*x.shape, 37, dtype=dtype), ids, window, stride)
    assert r.perplexity == pytest.approx(37, rel=tol)
    assert r.tokens == 100 and r.nll == pytest.approx(math.log(37), rel=tol)


@pytest.mark.parametrize("n,window,stride", [(50, 7, 7), (50, 7, 3), (9, 30, 5), (101, 16, 1), (33, 32, 16)])
def test_every_token_after_the_first_is_scored_exactly_once(n, window, stride):
    scored = []
    for begin, end, skip in plan_windows(n, window, stride):
        assert end - begin <= window
        scored += list(range(begin + 1 + skip, end + 1))
    assert scored == list(range(1, n))


def test_equals_direct_computation_when_the_context_fits(gpt):
    ids = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = gpt(ids[None, :-1], ids[None, 1:])
    for stride in (None, 10):
        r = perplexity(gpt_fn(gpt), ids, window=32, stride=stride)
        assert r.nll == pytest.approx(loss.item(), rel=1e-6) and r.tokens == 29


def test_stride_equal_to_window_is_the_non_overlapping_computation(gpt):
    ids = torch.randint(0, 50, (16 * 6 + 1,), generator=torch.Generator().manual_seed(2))
    x, y = ids[:-1].view(6, 16), ids[1:].view(6, 16)  # six independent chunks, nanoGPT style
    with torch.no_grad():
        expected = F.cross_entropy(gpt(x)[0].reshape(-1, 50), y.reshape(-1)).item()
    assert perplexity(gpt_fn(gpt), ids, window=16, stride=16).nll == pytest.approx(expected, rel=1e-6)
    assert perplexity(gpt_fn(gpt), ids, window=16).nll == pytest.approx(expected, rel=1e-6)
    overlapping = perplexity(gpt_fn(gpt), ids, window=16, stride=4)
    assert overlapping.tokens == 96 and overlapping.nll != pytest.approx(expected, rel=1e-6)


def test_sliding_window_equals_scoring_each_token_with_its_own_context(gpt):
    # Token a is scored by the first window reaching it; that window starts at the first multiple of the
    # stride >= a - window. One forward pass per token over exactly that context must give the same sum.
    ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(5))
    window, stride = 16, 5
    total = 0.0
    with torch.no_grad():
        for a in range(1, 40):
            begin = max(0, math.ceil((a - window) / stride)) * stride
            logits, _ = gpt(ids[None, begin:a])
            total -= torch.log_softmax(logits[0, -1].double(), -1)[ids[a]].item()
    r = perplexity(gpt_fn(gpt), ids, window, stride)
    assert r.nll_sum == pytest.approx(total, rel=1e-6) and r.tokens == 39


def test_batched_windows_equal_one_at_a_time(gpt):
    ids = np.random.default_rng(3).integers(0, 50, 200).astype(np.uint16)  # memmap-like dtype
    one = perplexity(gpt_fn(gpt), ids, window=32, stride=8)
    many = perplexity(gpt_fn(gpt), ids, window=32, stride=8, batch_size=5)
    assert many.nll == pytest.approx(one.nll, rel=1e-6) and many.tokens == one.tokens == 199


def test_sliding_window_is_exact_for_a_model_with_one_token_of_context():
    # A bigram "model" only looks at the previous token, so any window/stride scores every token fully:
    # the result must equal the bigram baseline computed by counting.
    rng = np.random.default_rng(4)
    vocab, k = 12, 0.5
    train, val = rng.integers(0, vocab, 500), rng.integers(0, vocab, 120)
    table = bigram_table(train, vocab, k)
    expected = bigram_perplexity(train, val, vocab, k=k)
    for window, stride in [(1, 1), (7, 3), (50, 50), (200, None)]:
        r = perplexity(lambda x: table[x], val, window, stride)
        assert r.nll == pytest.approx(expected.nll, rel=1e-12) and r.tokens == expected.tokens


def test_bits_per_byte():
    ids = list(range(9)) * 3
    r = perplexity(lambda x: torch.zeros(*x.shape, 16, dtype=torch.float64), ids, 8, byte_count=100)
    assert r.bits_per_byte == pytest.approx(26 * math.log(16) / (math.log(2) * 100))
    assert r.bits_per_byte == pytest.approx(26 * 4 / 100)  # 4 bits per token under a uniform 16-way guess


def test_unigram_and_bigram_baselines_by_hand():
    train = np.array([0, 1, 0, 2])  # counts 2, 1, 1; pairs (0,1) (1,0) (0,2)
    u = unigram_perplexity(train, [1, 0, 0], vocab_size=3, k=1.0)
    assert u.nll == pytest.approx(-(math.log(3 / 7) + math.log(3 / 7)) / 2)
    b = bigram_perplexity(train, [0, 1, 0, 0], vocab_size=3, k=1.0)
    # P(1|0) = (1+1)/(2+3), P(0|1) = (1+1)/(1+3), P(0|0) = (0+1)/(2+3)
    assert b.nll == pytest.approx(-(math.log(2 / 5) + math.log(2 / 4) + math.log(1 / 5)) / 3)
    assert fit_add_k(np.tile([0, 1, 2, 3], 50), 4, order=2) == 0.001  # deterministic text: tiny k wins


def test_bad_input_raises_clear_errors(gpt):
    fn = gpt_fn(gpt)
    with pytest.raises(ValueError, match="larger than window"):
        perplexity(fn, list(range(20)), window=4, stride=5)
    with pytest.raises(ValueError, match="holds 0 token"):
        perplexity(fn, [], window=4)
    with pytest.raises(ValueError, match="holds 1 token"):
        perplexity(fn, [3], window=4)
    with pytest.raises(TypeError, match="integers"):
        perplexity(fn, [0.5, 1.5, 2.0], window=4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(fn, [1, 2, 60], window=4)
    with pytest.raises(ValueError, match="must map ids"):
        perplexity(lambda x: torch.zeros(5), [1, 2, 3], window=4)
    with pytest.raises(ValueError, match="window=0"):
        perplexity(fn, [1, 2, 3], window=0)
    with pytest.raises(ValueError, match="outside"):
        bigram_perplexity([0, 1, 5], [0, 1], vocab_size=3)
    with pytest.raises(ValueError, match="k=0"):
        unigram_perplexity([0, 1], [0, 1], vocab_size=3, k=0)
