import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from minilm.checkpoint import load_checkpoint
from minilm.train import TrainingAborted, get_lr, train

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_trains_and_writes_artifacts(tiny_run):
    for name in ("ckpt.pt", "ckpt_best.pt", "config.yaml", "metrics.jsonl", "learning_curve.png", "train.log",
                 "tokenizer.json"):
        assert (tiny_run / name).is_file(), name
    rows = read_metrics(tiny_run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # the loss falls clearly
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_ppl"] == pytest.approx(2.718281828 ** evals[-1]["val_loss"], rel=1e-6)
    ckpt = load_checkpoint(tiny_run)
    assert ckpt["step"] == 40 and ckpt["meta"]["vocab_size"] == ckpt["config"]["model"]["vocab_size"]
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}


def test_lr_schedule_warmup_then_cosine():
    cfg = tiny_run_config("x", "y", lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110).train
    lrs = [get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[115] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_resume_reproduces_the_uninterrupted_run(tiny_data_dir, tmp_path):
    common = {"max_iters": 30, "lr_decay_iters": 30, "eval_interval": 10, "log_interval": 1, "dropout": 0.1,
              "sample_tokens": 0}
    train(tiny_run_config(tiny_data_dir, tmp_path / "full", **common))
    part = tiny_run_config(tiny_data_dir, tmp_path / "part", **{**common, "max_iters": 10})
    train(part)
    train(tiny_run_config(tiny_data_dir, tmp_path / "part", **common, resume=True))
    full = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    resumed = [r for r in read_metrics(tmp_path / "part") if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 31))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit for bit on CPU
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])


def test_gradient_accumulation_equals_big_batch(tiny_data_dir, tmp_path):
    # After one AdamW step, exp_avg = (1 - beta1) * grad: read the gradient back from the checkpoint.
    grads = []
    for bs, accum in ((16, 1), (4, 4)):
        out = tmp_path / f"bs{bs}"
        train(tiny_run_config(tiny_data_dir, out, batch_size=bs, grad_accum=accum, max_iters=1, warmup_iters=0,
                              grad_clip=0.0, eval_iters=1, sample_tokens=0))
        state = load_checkpoint(out)["optimizer"][0]["state"]  # a list: one state per optimizer
        grads.append(torch.cat([s["exp_avg"].flatten() / 0.1 for _, s in sorted(state.items())]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=0), (grads[0] - grads[1]).abs().max()


def test_non_finite_loss_skips_then_aborts(tiny_data_dir, tmp_path):
    with pytest.raises(TrainingAborted, match="non-finite.*Lower --lr"):
        train(tiny_run_config(tiny_data_dir, tmp_path / "nan", lr=1e30, min_lr=1e29, warmup_iters=0,
                              grad_clip=0.0, max_iters=50, max_bad_steps=3))


def test_early_stopping_and_ema(tiny_data_dir, tmp_path):
    result = train(tiny_run_config(tiny_data_dir, tmp_path / "es", lr=1e-12, min_lr=1e-13, max_iters=200,
                                   eval_interval=5, early_stop_patience=2, ema_decay=0.9, sample_tokens=0))
    assert result["stopped_by"] == "early_stop" and result["step"] < 200
    assert load_checkpoint(tmp_path / "es")["ema"] is not None


def test_missing_checkpoint_on_resume_is_clear(tiny_data_dir, tmp_path):
    from minilm.train import main

    rc = main([f"--data_dir={tiny_data_dir}", f"--out_dir={tmp_path}/none", "--resume", "--progress=false"])
    assert rc == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _sigint_as_in_a_terminal() -> None:
    # A background job of a non-interactive shell (`make test &`, nohup, CI wrappers) inherits SIGINT as
    # *ignored*, and Python then never turns it into KeyboardInterrupt: the child would train on and time out.
    # A terminal's Ctrl-C reaches a process whose SIGINT is the default, so the child starts with that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_and_resume_continues(tiny_data_dir, tmp_path, sig):
    # SIGTERM is what a scheduler (Slurm, Kubernetes, Colab's shutdown) sends before it kills the job.
    out = tmp_path / "int"
    args = [sys.executable, "-m", "minilm.train", "--preset=tiny", f"--data_dir={tiny_data_dir}", f"--out_dir={out}",
            "--n_layer=2", "--n_embd=64", "--block_size=64", "--batch_size=8", "--max_iters=100000",
            "--eval_interval=100000", "--log_interval=5", "--progress=false", "--tensorboard=false"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 300  # a loaded machine can take long to import torch; only the wait grows
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]  # still training when the signal comes
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "--resume" in output
    step = load_checkpoint(out)["step"]
    assert step >= 10
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    result = subprocess.run(args[:-6] + [f"--max_iters={step + 5}", "--eval_interval=1000", "--resume",
                                         "--progress=false", "--tensorboard=false"],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_checkpoint(out)["step"] == step + 5


def test_torchrun_two_processes_gloo_identical_weights(tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", "--nnodes=1", "--node_rank=0",
           "-m", "minilm.train", "--preset=tiny", f"--data_dir={tiny_data_dir}", f"--out_dir={out}", "--n_layer=2",
           "--n_embd=64", "--block_size=64", "--batch_size=4", "--grad_accum=2", "--max_iters=6", "--eval_interval=3",
           "--eval_iters=2", "--sample_tokens=0", "--progress=false", "--tensorboard=false"]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    assert "weights on all 2 ranks identical: True" in result.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 6 and len(ckpt["data"]["ranks"]) == 2
    assert ckpt["data"]["ranks"][0] != ckpt["data"]["ranks"][1]  # each rank samples its own windows


def test_sample_cli(tiny_run):
    result = subprocess.run([sys.executable, "-m", "minilm.sample", f"--out_dir={tiny_run}", "--prompt=def ",
                             "--max_new_tokens=20", "--seed=1"], env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("def ") >= 1 and "sample 1" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "minilm.sample", f"--out_dir={tiny_run}", "--top_p=2"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr


def test_profiler_trace_and_tensorboard_events(tiny_data_dir, tmp_path):
    out = tmp_path / "prof"
    train(tiny_run_config(tiny_data_dir, out, max_iters=8, eval_interval=8, profile=True, tensorboard=True,
                          sample_tokens=0))
    assert list((out / "profile").glob("*.json")), "no profiler trace written"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_float16_with_grad_scaler_runs_on_cpu(tiny_data_dir, tmp_path):
    # The CUDA fp16 path (autocast + GradScaler, unscale before clipping) exercised on the CPU.
    out = tmp_path / "fp16"
    result = train(tiny_run_config(tiny_data_dir, out, dtype="float16", max_iters=20, eval_interval=20,
                                   sample_tokens=0))
    assert result["val_loss"] < 6.0
    scaler = load_checkpoint(out)["scaler"]
    assert scaler and scaler["scale"] > 0


def test_stream_text_pieces_stop_strings_and_counts(tiny_run):
    from minilm.sample import generate_text, load_run, stream_text

    model, tok, ckpt = load_run(tiny_run)
    free = generate_text(model, tok, "def ", max_new_tokens=40, temperature=0, stop=None)
    assert free["completion_tokens"] == 40
    pieces = list(stream_text(model, tok, "def ", max_new_tokens=40, temperature=0))
    assert "".join(pieces) == free["text"]
    text = free["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a two-character string that does occur
    if stop.strip():
        cut = generate_text(model, tok, "def ", max_new_tokens=40, temperature=0, stop=[stop])
        assert cut["text"] == text[: text.find(stop)]
        assert stop not in cut["text"]
