"""The benchmark's memory helpers and table (no timings are asserted)."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from efficient_training.bench import activation_bytes, largest_batch, main, markdown
from minilm.config import ModelConfig

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("ckpt", [False, True])
def test_largest_batch_is_the_largest_that_fits(ckpt):
    budget_mb = 3.0
    b = largest_batch(CFG, budget_mb, ckpt, CPU)
    assert b > 0
    assert activation_bytes(CFG, b, ckpt, CPU) <= budget_mb * 2**20 < activation_bytes(CFG, b + 1, ckpt, CPU)


def test_checkpointing_fits_a_bigger_batch():
    assert largest_batch(CFG, 3.0, True, CPU) > largest_batch(CFG, 3.0, False, CPU)


def test_markdown_ratios_and_missing_memory():
    rows = [dict(name="fp32 baseline", ms=100.0, tok_s=1000.0, mem_mb=10.0),
            dict(name="fast", ms=50.0, tok_s=2000.0, mem_mb=5.0),
            dict(name="DDP 2 processes (ours)", ms=60.0, tok_s=1500.0, mem_mb=math.nan)]
    lines = markdown(rows, "header", "activation MB").splitlines()
    assert lines[5] == "| fast | 50 | 2,000 | 2.00x | 5.0 | 0.50x |"
    assert lines[6].endswith("| 1.50x | - | - |")


def test_bad_arguments_say_what_to_do():
    with pytest.raises(SystemExit, match="multiple of 4"):
        main(["--batch", "6", "--no-ddp"])


def test_a_run_leaves_tracked_files_alone(monkeypatch):
    # The smallest real run (tiny preset, batch 4, one timed step, small memory search) from the repository root,
    # where `python -m efficient_training.bench` is documented to run: it writes to out/bench/, git-ignored.
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(root), "rev-parse"],
                                                     capture_output=True).returncode:
        pytest.skip("not a git checkout")
    status = lambda: subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                                    capture_output=True, text=True, check=True).stdout
    before = status()
    monkeypatch.chdir(root)
    main(["--batch", "4", "--steps", "1", "--no-ddp", "--mem-budget-mb", "8"])
    assert status() == before  # no tracked file changed, nothing new that git would pick up
    assert (root / "out" / "bench" / "bench_tiny_cpu.md").is_file()
