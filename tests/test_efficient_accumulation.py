"""Accumulated micro-batch gradients against the big batch's gradient (fp32, within 1e-6)."""

import pytest
import torch

from efficient_training.accumulation import accumulate_gradients, concat_micro_batches, summed_loss
from minilm.config import ModelConfig
from minilm.model import GPT


def _model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _micro(shapes, seed=0, ignore=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for B, T in shapes:
        x = torch.randint(0, 64, (B, T), generator=gen)
        y = torch.randint(0, 64, (B, T), generator=gen)
        if ignore:
            y[0, T // 3 :] = -1  # e.g. padding after a short document
        out.append((x, y))
    return out


def _big_batch_grads(micro):
    model = _model()
    x, y = concat_micro_batches(micro)
    _, loss = model(x, y)  # mean over every counted token of the big batch
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], loss.item()


def _accumulated(micro, normalize="tokens"):
    model = _model()
    loss = accumulate_gradients(model, micro, normalize=normalize)
    return [p.grad.clone() for p in model.parameters()], loss


def _max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


EQUAL = dict(shapes=[(2, 16)] * 4)
UNEQUAL = dict(shapes=[(3, 16), (1, 5), (2, 12), (2, 3)], ignore=True)


@pytest.mark.parametrize("case", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_accumulated_gradient_equals_big_batch(case):
    micro = _micro(**case)
    ref, ref_loss = _big_batch_grads(micro)
    got, loss = _accumulated(micro)
    assert _max_diff(ref, got) <= 1e-6
    assert abs(loss - ref_loss) <= 1e-5


def test_dividing_by_micro_batch_count_is_right_only_for_equal_token_counts():
    micro = _micro(**EQUAL)
    assert _max_diff(_big_batch_grads(micro)[0], _accumulated(micro, "micro_batches")[0]) <= 1e-6
    micro = _micro(**UNEQUAL)
    assert _max_diff(_big_batch_grads(micro)[0], _accumulated(micro, "micro_batches")[0]) > 1e-4


def test_no_division_gives_k_times_the_gradient():
    micro = _micro(**EQUAL)
    ref, _ = _big_batch_grads(micro)
    got, _ = _accumulated(micro, "none")
    assert _max_diff(ref, got) > 1e-4
    assert _max_diff([4 * g for g in ref], got) <= 1e-5


def test_bad_input_is_reported():
    model = _model()
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="normalize"):
        accumulate_gradients(model, [(x, x)], normalize="mean")
    with pytest.raises(ValueError, match="no target tokens"):
        accumulate_gradients(model, [(x, torch.full_like(x, -1))])
    with pytest.raises(ValueError, match="empty"):
        accumulate_gradients(model, [])
    assert summed_loss(model, x, torch.full_like(x, -1)).item() == 0.0
