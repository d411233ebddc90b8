"""check.activation_checkpoint and check.ddp_all_reduce pass the learner-style solutions, fail the planted bugs
(one test each) and count torch's or efficient_training's own code as the reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint as torch_ckpt

from course import check
from course import solutions as sol


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def ok(r) -> bool:
    return bool(r) and not r.uses_reference


# ----------------------------------------------------------------------------- activation checkpointing
# Planted-wrong MyCheckpoint backwards: each differs from the solution in one step.


def _fresh_inputs(ctx):
    """The saved inputs as leaves that require grad, the other arguments as they were."""
    saved = iter(ctx.saved_tensors)
    return [next(saved).detach().requires_grad_(True) if t else o for t, o in zip(ctx.is_tensor, ctx.others)]


def _grads(inputs):
    return (None, *[a.grad if torch.is_tensor(a) else None for a in inputs])


class NoGradRecompute(sol.MyCheckpoint):
    """Recomputes under no_grad: the fresh copy has no graph, so nothing flows to x or the parameters."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = _fresh_inputs(ctx)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.rng)
            out = ctx.fn(*inputs)
        if out.requires_grad:
            out.backward(grad_outputs[0])
        return _grads(inputs)


class NoRngRestore(sol.MyCheckpoint):
    """Recomputes with whatever the RNG holds now: dropout draws other masks the second time."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = _fresh_inputs(ctx)
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        out.backward(grad_outputs[0])
        return _grads(inputs)


class RestoreWithoutFork(sol.MyCheckpoint):
    """Right gradients, but set_rng_state outside fork_rng rewinds the training's own random stream."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = _fresh_inputs(ctx)
        torch.set_rng_state(ctx.rng)
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        out.backward(grad_outputs[0])
        return _grads(inputs)


class RecomputesInFp32(sol.MyCheckpoint):
    """Right without autocast; under bf16 autocast the recomputation (outside the training's autocast) runs in fp32."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = _fresh_inputs(ctx)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.rng)
            with torch.enable_grad():
                out = ctx.fn(*inputs)
        torch.autograd.backward(out, grad_outputs[0].to(out.dtype))
        return _grads(inputs)


class SavesEverything(torch.autograd.Function):
    """Right gradients, no memory saved: forward builds fn's whole graph and keeps it until backward."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.inputs = [a.detach().requires_grad_(True) if torch.is_tensor(a) else a for a in args]
        with torch.enable_grad():
            ctx.out = fn(*ctx.inputs)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, *grad_outputs):
        ctx.out.backward(grad_outputs[0])
        return (None, *[a.grad if torch.is_tensor(a) else None for a in ctx.inputs])


def test_checkpoint_solution_passes():
    assert ok(check.activation_checkpoint(sol.my_checkpoint, seed=0))
    assert ok(check.activation_checkpoint(sol.my_checkpoint))


@pytest.mark.parametrize("variant, says", [
    (NoGradRecompute, "no gradient"), (NoRngRestore, "same masks"), (RestoreWithoutFork, "RNG stream"),
    (SavesEverything, "bytes of activations"), (RecomputesInFp32, "autocast")])
def test_checkpoint_bugs_fail(variant, says):
    r = check.activation_checkpoint(lambda fn, *args: variant.apply(fn, *args), seed=1)
    assert not r and says in r.message


def test_checkpoint_torch_and_package_count_as_the_reference():
    from efficient_training.checkpointing import checkpoint

    for fn in (lambda f, *a: torch_ckpt.checkpoint(f, *a, use_reentrant=False),
               lambda f, *a: torch_ckpt.checkpoint(f, *a, use_reentrant=True),
               lambda f, *a: checkpoint(f, *a), check.reference("activation_checkpoint")):
        r = check.activation_checkpoint(fn, seed=2)
        assert r and r.uses_reference


def test_checkpoint_stub_is_not_implemented():
    def stub(fn, *args):
        raise NotImplementedError("not yet")

    r = check.activation_checkpoint(stub)
    assert not r and r.not_implemented


# ----------------------------------------------------------------------------- DDP's gradient all-reduce


def sum_without_divide(model, world_size):  # efficient_training.ddp.DDP(average=False)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def forgets_a_parameter(model, world_size):
    for p in [q for q in model.parameters() if q.grad is not None][:-1]:
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def reduces_a_copy(model, world_size):
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            g.div_(world_size)  # never copied back into p.grad


def divides_on_rank_zero_only(model, world_size):
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            if dist.get_rank() == 0:
                p.grad.div_(world_size)


def crashes_on_frozen(model, world_size):
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def test_ddp_solution_passes():
    assert ok(check.ddp_all_reduce(sol.my_all_reduce_grads, seed=0))
    assert ok(check.ddp_all_reduce(sol.my_all_reduce_grads))


@pytest.mark.parametrize("variant, says", [
    (sum_without_divide, "SUM over ranks"), (forgets_a_parameter, "was not all-reduced"),
    (reduces_a_copy, "was not all-reduced"), (divides_on_rank_zero_only, "rank 1"),
    (crashes_on_frozen, "raised")])
def test_ddp_bugs_fail(variant, says):
    r = check.ddp_all_reduce(variant, seed=1)
    assert not r and says in r.message


def test_ddp_package_reducer_counts_as_the_reference():
    from efficient_training.ddp import all_reduce_gradients

    for fn in (check.reference("ddp_all_reduce"), lambda m, w: all_reduce_gradients(list(m.parameters()), w)):
        r = check.ddp_all_reduce(fn, seed=2)
        assert r and r.uses_reference


def test_ddp_stub_is_not_implemented():
    def stub(model, world_size):
        raise NotImplementedError("not yet")

    r = check.ddp_all_reduce(stub)
    assert not r and r.not_implemented
