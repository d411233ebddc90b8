"""check.ablation: the learner's ablation passes only when every number in its table comes from the runs it names."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from course import check
from course import solutions as sol


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def test_ablation_passes_the_solution():
    r = check.ablation(sol.my_ablation, seed=0)
    assert r.passed and not r.uses_reference
    assert check.ablation(sol.my_ablation)


def _edited(edit):
    """The solution, with its rows changed by edit(rows) before they are returned."""
    def fn(*args):
        rows = sol.my_ablation(*args)
        edit(rows)
        return rows
    return fn


def _equal_time_as_equal_tokens(variants, config, opt_args, data_dir, out_root, tokens, seconds, train_kw):
    """Trains the 'equal time' run as long as the equal-tokens one: the speed is never used."""
    rows = []
    per_step = train_kw["batch_size"] * config.block_size
    for i, (name, changes) in enumerate(variants.items()):
        cfg = dataclasses.replace(config, **changes)
        steps = tokens // per_step
        out = Path(out_root) / f"v{i}"
        loss, tok_s, params = sol._my_variant_run(cfg, opt_args, data_dir, out, steps, train_kw)
        rows.append({"variant": name, "changes": changes, "params": params, "tokens_per_s": tok_s,
                     "equal_tokens": {"steps": steps, "val_loss": loss, "run": str(out)},
                     "equal_time": {"steps": steps, "val_loss": loss, "run": str(out)}})
    return rows


def _changes_ignored(variants, config, *rest):
    """Every variant trained as the base config, labelled with its changes."""
    rows = sol.my_ablation({name: {} for name in variants}, config, *rest)
    for row, changes in zip(rows, variants.values()):
        row["changes"] = dict(changes)
    return rows


def _estimated_loss(rows):
    for row in rows:
        row["equal_tokens"]["val_loss"] = json.loads(
            (Path(row["equal_tokens"]["run"]) / "metrics.jsonl").read_text().splitlines()[-2])["val_loss"]


def _typed_speed(rows):
    for row in rows:
        row["tokens_per_s"] = round(row["tokens_per_s"], -3)


@pytest.mark.parametrize("fn, says", [
    (_equal_time_as_equal_tokens, "equal time is"),
    (_changes_ignored, "the variant asks for"),
    (_edited(_estimated_loss), "whole val split"),
    (_edited(_typed_speed), "metrics.jsonl rows give"),
    (_edited(lambda rows: rows.pop()), "expected a list of 2 rows"),
    (_edited(lambda rows: rows.reverse()), "in order"),
], ids=["no-speed", "changes-ignored", "estimate", "typed-speed", "missing-row", "order"])
def test_ablation_fails_a_table_its_runs_do_not_back(fn, says):
    r = check.ablation(fn, seed=1)
    assert not r and says in r.message, r.message


def test_ablation_with_the_package_trainer_is_the_reference(monkeypatch):
    """A row whose runs were trained by minilm.train is refused (the run dir says so); a call is seen too."""
    from minilm.config import RunConfig, TrainConfig
    from minilm.train import train

    def package_ablation(variants, config, opt_args, data_dir, out_root, tokens, seconds, train_kw):
        rows = []
        for i, (name, changes) in enumerate(variants.items()):
            cfg = RunConfig(model=dataclasses.replace(copy.deepcopy(config), **changes), train=TrainConfig(
                data_dir=str(data_dir), out_dir=str(Path(out_root) / f"v{i}"), max_iters=20, lr_decay_iters=20,
                eval_interval=20, batch_size=8, warmup_iters=2, sample_tokens=0, progress=False, tensorboard=False,
                dtype="float32", device="cpu"))
            res = train(cfg)
            run = {"steps": 20, "val_loss": res["val_loss"], "run": cfg.train.out_dir}
            rows.append({"variant": name, "changes": changes, "params": 0, "tokens_per_s": 1.0,
                         "equal_tokens": run, "equal_time": run})
        return rows

    r = check.ablation(package_ablation, seed=2)
    assert not r and "not written by your my_train" in r.message


def test_ablation_stub_is_not_implemented():
    def stub(*args):
        raise NotImplementedError("not yet")

    r = check.ablation(stub)
    assert not r and "not implemented" in r.message.lower()


def test_ablation_with_accumulation_and_grad_checkpoint(tiny_data_dir, tmp_path):
    """The step count divides by accumulation too, and a checkpointed variant trains like the plain one."""
    import torch

    from minilm.checkpoint import load_checkpoint
    from minilm.config import ModelConfig

    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    config = ModelConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=2, n_head=2, n_embd=32)
    train_kw = dict(batch_size=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_iters=2, log_interval=2,
                    seed=0, device="cpu", dtype="float32")
    rows = sol.my_ablation({"base": {}, "checkpointed": {"grad_checkpoint": True}}, config,
                           (3e-3, 0.02, 0.1, (0.9, 0.95), 0.95), tiny_data_dir, tmp_path, 6 * 4 * 2 * 32, 0.5,
                           train_kw)
    assert [r["equal_tokens"]["steps"] for r in rows] == [6, 6]
    assert load_checkpoint(rows[1]["equal_tokens"]["run"])["step"] == 6
    assert rows[1]["equal_tokens"]["val_loss"] == pytest.approx(rows[0]["equal_tokens"]["val_loss"], rel=1e-4)
    assert rows[0]["params"] == rows[1]["params"] and torch.isfinite(torch.tensor(rows[1]["tokens_per_s"]))
