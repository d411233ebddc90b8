"""minilm.gpu_check: the dry run takes the GPU path end to end on the CPU and writes a report with every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minilm import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_plan_runs_the_full_schedule_only_when_it_fits():
    fits = gpu_check.plan_steps(1_000_000, 32_768, 4500, budget_s=330)
    assert fits["fits"] and fits["steps"] == 4500 and fits["full_schedule_s"] == pytest.approx(147.456)
    short = gpu_check.plan_steps(100_000, 32_768, 4500, budget_s=330)
    assert not short["fits"] and short["steps"] == int(330 * 100_000 / 32_768)
    assert short["full_schedule_s"] == pytest.approx(4500 * 32_768 / 100_000)
    with pytest.raises(ValueError, match="no training throughput"):
        gpu_check.plan_steps(0, 32_768, 4500, 330)


def test_without_cuda_it_says_to_use_the_dry_run(capsys, tmp_path):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    assert gpu_check.main(["--out_dir", str(tmp_path)]) == 2
    assert "--dry_run" in capsys.readouterr().err


def test_dry_run_writes_every_field(tmp_path):
    """What `make gpu-check ARGS="--dry_run --out_dir DIR"` runs, as a subprocess from the repository root."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "minilm.gpu_check", "--dry_run", "--out_dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and report["problems"] == []
    assert set(report["phases"]) == {"data", "probe", "train", "evaluate", "serve"}
    for ph in report["phases"].values():
        assert ph["wall_s"] > 0 and ph["peak_rss_mb"] > 0
    assert report["train_plan"]["tokens_per_s"] > 0 and report["train"]["steps"] == report["train_plan"]["steps"]
    assert {t["metric"] for t in report["targets"]} == set(gpu_check.TARGETS)
    for t in report["targets"]:
        assert t["measured"] is not None and t["met"] in (True, False), t
    ev = report["eval"]
    assert ev["val_perplexity"] > 1 and 0 < ev["bits_per_byte"] < 20
    assert ev["bleu"]["low"] <= ev["bleu"]["value"] <= ev["bleu"]["high"] and ev["task_prompts"] > 0
    sv = report["serve"]
    assert sv["8_clients"]["ok"] == sv["8_clients"]["requests"] and sv["8_clients"]["tokens_per_s"] > 0
    if (ROOT / "docs" / "scaling.json").is_file():
        assert report["scaling_prediction"]["val_perplexity"] > 1
    md = (out / "report.md").read_text()
    assert "dry run" in md and "| serve |" in md and "validation perplexity" in md
