"""The training-stack checks (course/check/stack.py) pass the reference solutions, fail planted bugs, and count
torch's or minilm's own code as the reference; the learner's loop writes a run minilm's tools read."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from course import check
from course import solutions as sol


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def ok(r) -> bool:
    return bool(r) and not r.uses_reference


# ----------------------------------------------------------------------------- AdamW


class NoBiasCorrection(sol.MyAdamW):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(st["exp_avg"], st["exp_avg_sq"].sqrt().add_(eps), value=-lr)


class CoupledDecay(sol.MyAdamW):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(p, alpha=group["weight_decay"])  # Adam + L2, not AdamW
            wd, group["weight_decay"] = group["weight_decay"], 0.0
            try:
                super().step()
            finally:
                group["weight_decay"] = wd


class MomentsOutsideState(torch.optim.Optimizer):
    """Right numbers, but m and v live in an attribute: state_dict() does not carry them."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.inner = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                t, m, v = self.inner.get(id(p), (0, torch.zeros_like(p), torch.zeros_like(p)))
                t += 1
                self.inner[id(p)] = (t, m, v)
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps), value=-lr / (1 - b1**t))


class WrapsTorch(torch.optim.AdamW):
    """Its own step, which hands the work to torch's."""

    def step(self, closure=None):
        return super().step(closure)


def test_adamw_optimizer_passes_the_solution():
    assert ok(check.adamw_optimizer(sol.MyAdamW, seed=1))


@pytest.mark.parametrize("bad", [NoBiasCorrection, CoupledDecay, MomentsOutsideState])
def test_adamw_optimizer_fails_planted_bugs(bad):
    r = check.adamw_optimizer(bad, seed=2)
    assert not r and "after step" in r.message


@pytest.mark.parametrize("ref", [torch.optim.AdamW, type("Same", (torch.optim.AdamW,), {}), WrapsTorch])
def test_adamw_optimizer_torch_counts_as_reference(ref):
    r = check.adamw_optimizer(ref, seed=3)
    assert r.passed and r.uses_reference


# ----------------------------------------------------------------------------- Newton-Schulz and Muon


def test_newton_schulz_passes_the_solution_and_an_honest_rewrite():
    def other_order(g, coefficients, steps, eps):  # same maths, bf16 arithmetic in another order
        a, b, c = coefficients
        x = g.bfloat16()
        x = x.T if g.size(0) > g.size(1) else x
        x = x / (x.norm() + eps)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if g.size(0) > g.size(1) else x

    assert ok(check.newton_schulz(sol.my_newton_schulz, seed=4))
    assert ok(check.newton_schulz(other_order, seed=4))


@pytest.mark.parametrize("coefficients", [(1.5, -0.5, 0.0), (3.4, -4.8, 2.0), (2.0315, -4.7750, 3.4445)])
def test_newton_schulz_fails_wrong_coefficients(coefficients):
    r = check.newton_schulz(lambda g, _c, steps, eps: sol.my_newton_schulz(g, coefficients, steps, eps), seed=5)
    assert not r


def test_newton_schulz_fails_fixed_steps_and_in_place_scaling():
    assert not check.newton_schulz(lambda g, c, steps, eps: sol.my_newton_schulz(g, c, 5, eps), seed=6)

    def in_place(g, c, steps, eps):
        g.div_(g.norm())
        return sol.my_newton_schulz(g, c, steps, eps)

    r = check.newton_schulz(in_place, seed=6)
    assert not r and "in place" in r.message


def test_newton_schulz_torch_counts_as_reference():
    from torch.optim._muon import _zeropower_via_newtonschulz

    r = check.newton_schulz(lambda g, c, steps, eps: _zeropower_via_newtonschulz(g, c, steps, eps), seed=7)
    assert r.passed and r.uses_reference


class NoNesterov(sol.MyMuon):
    def __init__(self, params, **kw):
        kw["nesterov"] = False
        super().__init__(params, **kw)


class NoShapeScaling(sol.MyMuon):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                o = sol.my_newton_schulz(p.grad.lerp(buf, group["momentum"]))
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(o, alpha=-group["lr"])


class NoDecay(sol.MyMuon):
    def __init__(self, params, **kw):
        kw["weight_decay"] = 0.0
        super().__init__(params, **kw)


def test_muon_passes_the_solution():
    assert ok(check.muon(sol.MyMuon, seed=8))


@pytest.mark.parametrize("bad", [NoNesterov, NoShapeScaling, NoDecay])
def test_muon_fails_planted_bugs(bad):
    assert not check.muon(bad, seed=9)


def test_muon_torch_counts_as_reference():
    r = check.muon(torch.optim.Muon, seed=10)
    assert r.passed and r.uses_reference


# ----------------------------------------------------------------------------- parameter groups


def test_optimizer_groups_passes_the_solution():
    assert ok(check.optimizer_groups(sol.my_optimizers, seed=11))


def test_optimizer_groups_fails_decay_on_gains():
    def decays_gains(model, lr, muon_lr, wd, betas, mom):
        muon, adamw = sol.my_optimizers(model, lr, muon_lr, wd, betas, mom)
        for g in adamw.param_groups:
            g["weight_decay"] = wd
        return [muon, adamw]

    r = check.optimizer_groups(decays_gains, seed=12)
    assert not r and "weight_decay" in r.message


def test_optimizer_groups_fails_embeddings_in_muon():
    def all_matrices(model, lr, muon_lr, wd, betas, mom):
        mats = [p for p in model.parameters() if p.dim() == 2]
        vecs = [p for p in model.parameters() if p.dim() < 2]
        return [sol.MyMuon([{"params": mats, "peak_lr": muon_lr}], lr=muon_lr, weight_decay=wd, momentum=mom),
                sol.MyAdamW([{"params": vecs, "weight_decay": 0.0, "peak_lr": lr}], lr=lr, betas=betas)]

    r = check.optimizer_groups(all_matrices, seed=13)
    assert not r and "wte" in r.message


def test_optimizer_groups_torch_optimizers_count_as_reference():
    from minilm.optim import hidden_matrices

    def with_torch(model, lr, muon_lr, wd, betas, mom):
        muon, adamw = sol.my_optimizers(model, lr, muon_lr, wd, betas, mom)
        hidden = [{**g, "params": g["params"]} for g in muon.param_groups]
        return [torch.optim.Muon(hidden, lr=muon_lr, weight_decay=wd, momentum=mom),
                torch.optim.AdamW(adamw.param_groups, lr=lr, betas=betas)]

    r = check.optimizer_groups(with_torch, seed=14)
    assert r.passed and r.uses_reference
    assert hidden_matrices  # the package's own splitter exists, and calling it would count too


# ----------------------------------------------------------------------------- batches


def test_get_batch_passes_the_solution():
    assert ok(check.get_batch(sol.my_get_batch, seed=15))


def test_get_batch_fails_unshifted_targets_and_wrong_dtype():
    def unshifted(tokens, b, t, device, rng):
        x, _ = sol.my_get_batch(tokens, b, t, device, rng)
        return x, x.clone()

    r = check.get_batch(unshifted, seed=16)
    assert not r and "shifted by one" in r.message

    def int32(tokens, b, t, device, rng):
        x, y = sol.my_get_batch(tokens, b, t, device, rng)
        return x.int(), y.int()

    assert not check.get_batch(int32, seed=16)


def test_get_batch_package_counts_as_reference():
    from minilm.data import TokenData

    def through_package(tokens, b, t, device, rng):
        return TokenData.from_tokens(tokens).get_batch(b, t, device, rng=rng)

    r = check.get_batch(through_package, seed=17)
    assert r.passed and r.uses_reference


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_passes_the_solution():
    assert ok(check.checkpoint_resume(sol.my_save_checkpoint, sol.my_load_checkpoint, seed=18))


def _load_without(*skip):
    def load(path, model, optimizers, data_rng):
        ckpt = torch.load(path, weights_only=True)
        keep = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "data": data_rng.bit_generator.state}
        sol.my_load_checkpoint(path, model, optimizers, data_rng)
        if "torch" in skip:
            torch.set_rng_state(keep["torch"])
        if "numpy" in skip:
            np.random.set_state(keep["numpy"])
        if "data" in skip:
            data_rng.bit_generator.state = keep["data"]
        return ckpt

    return load


@pytest.mark.parametrize("lost,message", [("torch", "torch's RNG"), ("numpy", "numpy's global RNG"),
                                          ("data", "data sampler")])
def test_checkpoint_resume_fails_when_a_stream_is_not_restored(lost, message):
    r = check.checkpoint_resume(sol.my_save_checkpoint, _load_without(lost), seed=19)
    assert not r and message in r.message


def test_checkpoint_resume_fails_without_optimizer_state():
    def load(path, model, optimizers, data_rng):
        return sol.my_load_checkpoint(path, model, [type(o)(o.param_groups) for o in optimizers], data_rng)

    r = check.checkpoint_resume(sol.my_save_checkpoint, load, seed=20)
    assert not r and "state" in r.message


def test_checkpoint_resume_fails_a_file_weights_only_refuses():
    def save(path, model, optimizers, step, data_rng):
        torch.save({"model": model.state_dict(), "optimizer": [o.state_dict() for o in optimizers], "step": step,
                    "rng": {"numpy": np.random.get_state()}, "data": {}}, path)

    r = check.checkpoint_resume(save, sol.my_load_checkpoint, seed=21)
    assert not r and "weights_only" in r.message


def test_checkpoint_resume_package_counts_as_reference():
    from minilm.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    def save(path, model, optimizers, step, data_rng):
        save_checkpoint(path, model=model, optimizer=list(optimizers), step=step,
                        data_state={"rng": data_rng.bit_generator.state})

    def load(path, model, optimizers, data_rng):
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        for o, s in zip(optimizers, ckpt["optimizer"]):
            o.load_state_dict(s)
        set_rng_state(ckpt["rng"])
        data_rng.bit_generator.state = ckpt["data"]["rng"]
        return ckpt

    r = check.checkpoint_resume(save, load, seed=22)
    assert r.passed and r.uses_reference and rng_state


# ----------------------------------------------------------------------------- the loop


def test_train_loop_passes_the_solution():
    assert ok(check.train_loop(sol.my_train, sol.MyGPT, sol.my_optimizers, seed=23))


def test_train_loop_fails_a_loop_that_does_not_resume():
    def no_resume(model, optimizers, data_dir, out_dir, **kw):
        kw["resume"] = False
        return sol.my_train(model, optimizers, data_dir, out_dir, **kw)

    r = check.train_loop(no_resume, sol.MyGPT, sol.my_optimizers, seed=24)
    assert not r and "resume" in r.message


def test_train_loop_fails_without_the_learner_marker():
    def unmarked(model, optimizers, data_dir, out_dir, **kw):
        result = sol.my_train(model, optimizers, data_dir, out_dir, **kw)
        ckpt = torch.load(f"{out_dir}/ckpt.pt", weights_only=True)
        ckpt["extra"] = {}
        torch.save(ckpt, f"{out_dir}/ckpt.pt")
        return result

    r = check.train_loop(unmarked, sol.MyGPT, sol.my_optimizers, seed=25)
    assert not r and "trainer" in r.message


def test_train_loop_fails_a_schedule_off_by_one():
    right = sol.my_lr

    def late(it, warmup, decay, lr, min_lr):
        return right(it + 1, warmup, decay, lr, min_lr)

    def shifted(model, optimizers, data_dir, out_dir, **kw):
        old = sol.my_lr
        sol.my_lr = late
        try:
            return sol.my_train(model, optimizers, data_dir, out_dir, **kw)
        finally:
            sol.my_lr = old

    r = check.train_loop(shifted, sol.MyGPT, sol.my_optimizers, seed=26)
    assert not r and "lr" in r.message


def test_train_loop_package_model_or_optimizers_count_as_reference():
    from minilm.model import GPT
    from minilm.optim import build_optimizers

    r = check.train_loop(sol.my_train, GPT, sol.my_optimizers, seed=27)
    assert r.passed and r.uses_reference

    def package_optimizers(model, lr, muon_lr, wd, betas, mom):
        from types import SimpleNamespace

        return build_optimizers(model, SimpleNamespace(optimizer="muon", lr=lr, muon_lr=muon_lr, weight_decay=wd,
                                                       beta1=betas[0], beta2=betas[1], muon_momentum=mom), "cpu")

    r = check.train_loop(sol.my_train, sol.MyGPT, package_optimizers, seed=27)
    assert r.passed and r.uses_reference


# ----------------------------------------------------------------------------- the run minilm's tools read


def _learner_run(data_dir, out, dtype="float32", steps=12, grad_checkpoint=False, **kw):
    from minilm.config import ModelConfig

    meta = json.loads((data_dir / "meta.json").read_text())
    config = ModelConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope",
                         norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False,
                         grad_checkpoint=grad_checkpoint)
    torch.manual_seed(0)
    model = sol.MyGPT(config, checkpoint=sol.my_checkpoint)
    opts = sol.my_optimizers(model, 3e-3, 0.02, 0.1)
    kw = dict(max_iters=steps, batch_size=4, eval_interval=6, eval_iters=2, log_interval=3, warmup_iters=2) | kw
    result = sol.my_train(model, opts, data_dir, out, dtype=dtype, **kw)
    return result, model


def test_learner_run_loads_in_minilm_and_evaluates(tiny_data_dir, tmp_path):
    from minilm.checkpoint import model_from_checkpoint
    from minilm.evaluate import main as evaluate_main

    out = tmp_path / "my_run"
    result, mine = _learner_run(tiny_data_dir, out)
    model, ckpt = model_from_checkpoint(out)
    assert ckpt["extra"]["trainer"] == "learner"
    assert ckpt["extra"]["model_class"] == "course.solutions.MyGPT"
    assert ckpt["extra"]["optimizer_class"] == "course.solutions.MyMuon,course.solutions.MyAdamW"
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    torch.testing.assert_close(model(x)[0], mine.eval()(x)[0], atol=1e-5, rtol=1e-5)
    assert (out / "config.yaml").is_file() and math.isfinite(result["final_val_loss"])
    assert evaluate_main(["--out_dir", str(out), "--data_dir", str(tiny_data_dir), "--device", "cpu",
                          "--max_tokens", "2000", "--num_prompts", "8", "--function_prompts", "4",
                          "--bootstrap_samples", "20", "--speed_tokens", "4"]) == 0
    assert json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_learner_loop_under_autocast_on_cpu(tiny_data_dir, tmp_path, dtype):
    """bf16 autocast (the GPU path, exercised on the CPU) and fp16 with the learner's own MyScaler."""
    result, _ = _learner_run(tiny_data_dir, tmp_path / dtype, dtype=dtype, steps=6)
    rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert result["val_loss"] < math.log(json.loads((tiny_data_dir / "meta.json").read_text())["vocab_size"])


# ----------------------------------------------------------------------------- grad checkpointing in the learner's run
# grad_checkpoint meets: autocast (backward recomputes outside the autocast block), the fp16 loss scaler (scaled
# gradients through the recomputation) and resume (the checkpointed model must restart exactly).


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mygpt_grad_checkpoint_needs_a_checkpoint_function():
    from minilm.config import ModelConfig

    with pytest.raises(ValueError, match="checkpoint=my_checkpoint"):
        sol.MyGPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, grad_checkpoint=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_learner_loop_grad_checkpoint_trains_like_the_plain_model(tiny_data_dir, tmp_path, dtype, monkeypatch):
    """The learner's MyGPT with grad_checkpoint, through their my_checkpoint, in their loop: the same weights as
    without it (fp32, bf16 autocast, fp16 with MyScaler), and the blocks really were checkpointed."""
    calls = []
    real = sol.my_checkpoint
    monkeypatch.setattr(sol, "my_checkpoint", lambda fn, *a: calls.append(1) or real(fn, *a))
    _, plain = _learner_run(tiny_data_dir, tmp_path / "plain", dtype=dtype, steps=6)
    _, ckpt = _learner_run(tiny_data_dir, tmp_path / "ckpt", dtype=dtype, steps=6, grad_checkpoint=True)
    assert len(calls) == 6 * 2  # 6 steps x 2 blocks; evaluation (no gradients) runs the blocks plainly
    got = _weights(ckpt)
    for k, v in _weights(plain).items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=k)
    rows = lambda d: [r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
    assert rows("ckpt") == pytest.approx(rows("plain"), rel=1e-4)


def test_learner_loop_grad_checkpoint_with_accumulation(tiny_data_dir, tmp_path, monkeypatch):
    """Each micro-batch's backward recomputes its own blocks; the accumulated step is the plain one's."""
    calls = []
    real = sol.my_checkpoint
    monkeypatch.setattr(sol, "my_checkpoint", lambda fn, *a: calls.append(1) or real(fn, *a))
    _, plain = _learner_run(tiny_data_dir, tmp_path / "plain", steps=4, grad_accum=2)
    _, ckpt = _learner_run(tiny_data_dir, tmp_path / "ckpt", steps=4, grad_accum=2, grad_checkpoint=True)
    assert len(calls) == 4 * 2 * 2  # steps x micro-batches x blocks
    got = _weights(ckpt)
    for k, v in _weights(plain).items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_learner_loop_grad_checkpoint_resumes_bit_for_bit(tiny_data_dir, tmp_path):
    kw = dict(grad_checkpoint=True, eval_interval=4, lr_decay_iters=8, final_eval=False)
    _, whole = _learner_run(tiny_data_dir, tmp_path / "whole", steps=8, **kw)
    _learner_run(tiny_data_dir, tmp_path / "part", steps=4, **kw)
    _, resumed = _learner_run(tiny_data_dir, tmp_path / "part", steps=8, resume=True, **kw)
    got = _weights(resumed)
    for k, v in _weights(whole).items():
        assert torch.equal(got[k], v), k
