"""--resume: what comes from the checkpoint and what from the command line (minilm.resume.RESUME_SOURCE), changes
applied and logged or refused with the field named, the CPU dtype kept, and the DDP dtype broadcast."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_documents, tiny_run_config, write_data_dir

from minilm.checkpoint import load_checkpoint
from minilm.config import ConfigError, ModelConfig, TrainConfig
from minilm.train import train


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def cfg(data, out, **kw):
    return tiny_run_config(data, out, **{"max_iters": 6, "lr_decay_iters": 12, "eval_interval": 6, "eval_iters": 2,
                                         "log_interval": 1, "sample_tokens": 0, "final_eval": False, **kw})


def test_the_resume_table_names_every_config_field():
    from minilm.train import RESUME_SOURCE

    fields = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    fields |= {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_SOURCE) == fields  # a new field must be classified
    assert set(RESUME_SOURCE.values()) <= {"checkpoint", "run", "schedule", "dtype"}


def test_resume_applies_optimizer_hyperparameters(tiny_data_dir, tmp_path):
    out = tmp_path / "hyper"
    train(cfg(tiny_data_dir, out, optimizer="muon"))
    train(cfg(tiny_data_dir, out, optimizer="muon", max_iters=8, eval_interval=8, resume=True, muon_momentum=0.5,
              weight_decay=0.0, beta2=0.99))
    groups = [opt["param_groups"] for opt in load_checkpoint(out)["optimizer"]]
    assert [g["momentum"] for g in groups[0]] == [0.5] and [g["weight_decay"] for g in groups[0]] == [0.0]
    assert [g["weight_decay"] for g in groups[1]] == [0.0, 0.0] and groups[1][0]["betas"] == (0.9, 0.99)
    log = (out / "train.log").read_text()
    assert "changed on resume: muon_momentum: 0.95 -> 0.5" in log and "weight_decay: 0.1 -> 0.0" in log
    used = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert used["muon_momentum"] == 0.5 and used["weight_decay"] == 0.0


def test_resume_with_changed_dropout_and_grad_checkpoint_uses_them(tiny_data_dir, tmp_path):
    same, changed = tmp_path / "same", tmp_path / "changed"
    for out in (same, changed):
        train(cfg(tiny_data_dir, out))
    train(cfg(tiny_data_dir, same, max_iters=12, eval_interval=12, resume=True))
    train(cfg(tiny_data_dir, changed, max_iters=12, eval_interval=12, resume=True, dropout=0.2,
              grad_checkpoint=True))
    assert losses(same)[:6] == losses(changed)[:6]
    assert losses(same)[6:] != losses(changed)[6:]  # dropout acts from step 7 on
    model = load_checkpoint(changed)["config"]["model"]
    assert model["dropout"] == 0.2 and model["grad_checkpoint"] is True
    assert yaml.safe_load((changed / "config.yaml").read_text())["model"]["dropout"] == 0.2
    log = (changed / "train.log").read_text()
    assert "dropout: 0.0 -> 0.2" in log and "grad_checkpoint: False -> True" in log


def test_resume_refuses_shape_seed_and_optimizer_changes_naming_the_field(tiny_data_dir, tmp_path):
    out = tmp_path / "shape"
    train(cfg(tiny_data_dir, out))
    for field, value in (("n_layer", 3), ("n_embd", 96), ("block_size", 32), ("seed", 7), ("optimizer", "muon")):
        with pytest.raises(ConfigError, match=rf"cannot change {field} .* --{field}="):
            train(cfg(tiny_data_dir, out, max_iters=8, resume=True, **{field: value}))
    other = write_data_dir(tmp_path / "other", stdlib_documents(20), vocab_size=400)
    with pytest.raises(ConfigError, match="vocab_size: the data dir .* 400 tokens"):
        train(cfg(other, out, max_iters=8, resume=True))


def test_resume_x_grad_accumulation_equals_the_uninterrupted_run(tiny_data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(tiny_data_dir, full, grad_accum=2, max_iters=12, eval_interval=6, dropout=0.1))
    train(cfg(tiny_data_dir, part, grad_accum=2, dropout=0.1))
    train(cfg(tiny_data_dir, part, grad_accum=2, max_iters=12, dropout=0.1, resume=True))
    assert losses(part) == losses(full)


def test_resume_x_ema_equals_the_uninterrupted_run(tiny_data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(tiny_data_dir, full, ema_decay=0.9, max_iters=12))
    train(cfg(tiny_data_dir, part, ema_decay=0.9))
    train(cfg(tiny_data_dir, part, ema_decay=0.9, max_iters=12, resume=True))
    assert losses(part) == losses(full)
    a, b = load_checkpoint(full)["ema"], load_checkpoint(part)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_x_dtype_keeps_the_cpu_dtype_chosen_at_start(tiny_data_dir, tmp_path, monkeypatch):
    import minilm.device
    import minilm.run_setup

    probes = []

    def probe(speeds):
        return lambda *a, **k: probes.append(speeds) or speeds

    monkeypatch.setattr(minilm.device, "cpu_flags", lambda *a: {"avx512_bf16"})
    monkeypatch.setattr(minilm.run_setup, "bf16_speedup", probe((1000.0, 2000.0)))  # bf16 wins at the start
    out = tmp_path / "dtype"
    train(cfg(tiny_data_dir, out, dtype="auto"))
    assert load_checkpoint(out)["config"]["train"]["dtype"] == "bfloat16" and len(probes) == 1
    monkeypatch.setattr(minilm.run_setup, "bf16_speedup", probe((2000.0, 1000.0)))  # a new probe would say fp32
    train(cfg(tiny_data_dir, out, dtype="auto", max_iters=8, eval_interval=8, resume=True))
    assert len(probes) == 1  # no new probe
    assert load_checkpoint(out)["config"]["train"]["dtype"] == "bfloat16"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["dtype"] == "bfloat16"
    assert "dtype: bfloat16 (kept from the checkpoint" in (out / "train.log").read_text()
    train(cfg(tiny_data_dir, out, dtype="float32", max_iters=10, eval_interval=10, resume=True))  # asked for
    assert "changed on resume: dtype: 'bfloat16' -> 'float32'" in (out / "train.log").read_text()


# ----------------------------------------------------------------------------- the dtype probe under DDP


def _rank(rank: int, port: int, data: str, out: str, flags: list[list[str]], results) -> None:
    import minilm.device
    import minilm.run_setup

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    minilm.device.cpu_flags = lambda *a: set(flags[rank])  # this rank's machine
    minilm.run_setup.bf16_speedup = lambda *a, **k: (1000.0, 2000.0)
    try:
        result = train(cfg(data, out, dtype="auto", grad_accum=2, max_iters=2, eval_interval=2))
        results.put((rank, result["ranks_identical"]))
    except Exception as e:  # reported to the test, which fails with it
        results.put((rank, repr(e)))


@pytest.mark.parametrize("flags", [[["avx512_bf16"], []], [[], ["avx512_bf16"]]], ids=["rank0-bf16", "rank1-bf16"])
def test_ddp_dtype_probe_with_mixed_cpu_flags_does_not_deadlock(tiny_data_dir, tmp_path, flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tiny_data_dir), str(tmp_path / "ddp"), flags, results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (deadlock in the dtype broadcast)"
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == [(0, True), (1, True)]
    expected = "bfloat16" if flags[0] else "float32"  # rank 0's machine decides for all
    assert load_checkpoint(tmp_path / "ddp")["config"]["train"]["dtype"] == expected


def test_resume_without_flags_continues_the_run_as_it_was(tmp_path):
    """`--resume` alone: the shape and settings the run was started with, not the preset's defaults."""
    from minilm.config import parse_args
    from minilm.train import resume_config

    cfg, _ = parse_args(["--preset=tiny", "--n_layer=3", "--lr=0.005", "--dropout=0.1"], cuda=False)
    ckpt = {"config": cfg.to_dict()}
    meta = {"vocab_size": cfg.model.vocab_size}
    again, _ = parse_args(["--preset=tiny", "--resume"], cuda=False)
    assert resume_config(again, ckpt, meta) == []
    assert (again.model.n_layer, again.train.lr, again.model.dropout) == (3, 0.005, 0.1)
    changed, _ = parse_args(["--preset=tiny", "--resume", "--lr=0.001"], cuda=False)
    assert resume_config(changed, ckpt, meta) == ["lr: 0.005 -> 0.001"]
    assert changed.model.n_layer == 3
