"""`python -m course status` judges the five tasks from real artifacts and the self-check log."""

from __future__ import annotations

import json
import shutil

import pytest

from course.__main__ import main
from course.status import TASKS, status


def _write_log(path, verdicts: dict[str, bool]) -> None:
    path.write_text("".join(json.dumps({"check": k, "passed": v}) + "\n" for k, v in verdicts.items()))


def test_nothing_done(tmp_path):
    rows = status(tmp_path / "no_data", tmp_path / "no_run", log=tmp_path / "absent.jsonl")
    assert [r["done"] for r in rows] == [False] * 5
    assert "does not exist" in rows[0]["artifact"]
    assert "python -m minilm.train" in rows[3]["artifact"]
    assert "python -m minilm.evaluate" in rows[4]["artifact"]
    assert all(v is None for r in rows for v in r["checks"].values())


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with minilm.evaluate's real eval.json and eval.md."""
    from minilm.evaluate import evaluate

    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(tiny_run, run)
    evaluate(run, num_prompts=2, speed_tokens=8, max_train_tokens=50_000, max_tokens=4_000, progress=False)
    return run


def _beat_bigram(run, by: float) -> None:
    """Move the model's validation loss to the bigram baseline's + by (the evaluation's other numbers unchanged)."""
    r = json.loads((run / "eval.json").read_text())
    r["perplexity"]["sliding"]["nll"] = r["baselines"]["bigram"]["nll"] + by
    (run / "eval.json").write_text(json.dumps(r))


def _setup_files(tmp_path):
    config = tmp_path / "my_run.yaml"
    config.write_text("preset: tiny\nbatch_size: 8\ngrad_accum: 2\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_tiny_cpu.json").write_text(json.dumps({"rows": [{"name": "fp32", "tokens_per_s": 5000}]}))
    return config, bench


def test_tasks_done_from_artifacts_and_log(tiny_data_dir, evaluated_run, tmp_path):
    log = tmp_path / "checks.jsonl"
    every = {c: True for _, checks in TASKS.values() for c in checks}
    _write_log(log, every)
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    config, bench = _setup_files(tmp_path)
    kw = dict(target_tokens=1000, log=log, config=config, bench_dir=bench)
    _beat_bigram(run, +0.5)  # a run that does not beat counting bigrams is not done
    rows = status(tiny_data_dir, run, **kw)
    assert [r["done"] for r in rows] == [True, True, True, False, False]
    assert "not below the bigram baseline" in rows[3]["artifact"]
    assert "no load test yet" in rows[4]["artifact"] and "loadtest" in rows[4]["artifact"]
    _beat_bigram(run, -0.5)
    (run / "loadtest.json").write_text("report text\n" + json.dumps({"requests": 20, "errors": 0, "lost": 0}) + "\n")
    rows = status(tiny_data_dir, run, **kw)
    assert all(r["done"] for r in rows), [r["artifact"] for r in rows]
    assert "tokens (target 1,000)" in rows[0]["artifact"] and "below the bigram baseline" in rows[3]["artifact"]
    assert "preset tiny, batch 8 x 2" in rows[2]["artifact"]

    # A load test with errors, a config that does not load and a missing benchmark undo tasks 5 and 3.
    (run / "loadtest.json").write_text(json.dumps({"requests": 20, "errors": 3, "lost": 0}))
    assert "3 errors" in status(tiny_data_dir, run, **kw)[4]["artifact"]
    config.write_text("no_such_key: 1\n")
    assert "does not load" in status(tiny_data_dir, run, **kw)[2]["artifact"]
    config.write_text("preset: tiny\n")
    (bench / "bench_tiny_cpu.json").unlink()
    rows = status(tiny_data_dir, run, **kw)
    assert not rows[2]["done"] and "no benchmark JSON" in rows[2]["artifact"]
    assert "efficient_training.bench" in rows[2]["artifact"]

    # A token target above what the data dir holds, and a later failing verdict, undo tasks 1 and 2.
    rows = status(tiny_data_dir, run, target_tokens=10**9, log=log)
    assert not rows[0]["done"] and "below the target" in rows[0]["artifact"]
    with open(log, "a") as f:
        f.write(json.dumps({"check": "bleu", "passed": False}) + "\n")
        f.write("not json\n")  # a damaged line is skipped, not fatal
    rows = status(tiny_data_dir, run, target_tokens=1000, log=log)
    assert not rows[1]["done"] and rows[1]["checks"]["bleu"] == "FAIL"
    with open(log, "a") as f:  # a pass of the shipped reference call does not count either
        f.write(json.dumps({"check": "bleu", "passed": True, "reference": True}) + "\n")
    rows = status(tiny_data_dir, run, target_tokens=1000, log=log)
    assert not rows[1]["done"] and rows[1]["checks"]["bleu"] == "PASS with the reference"


def test_trained_run_without_evaluation_is_not_done(tiny_data_dir, tiny_run, tmp_path):
    run = tmp_path / "run"  # a copy without the eval files other tests may have written into the shared run
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*"))
    rows = status(tiny_data_dir, run, log=tmp_path / "log.jsonl")
    assert not rows[3]["done"] and "no eval.json yet" in rows[3]["artifact"]
    assert "minilm.evaluate" in rows[3]["artifact"]


def test_report(evaluated_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    assert main(["report", "--out_dir", str(run)]) == 0
    text = (run / "report.md").read_text()
    for part in ("## Learning curves", "report_curves.png", "## Metrics against the baselines", "bigram baseline",
                 "## Samples", "Greedy continuation", "## Config", "preset: tiny", "## Lessons learned"):
        assert part in text, part
    assert (run / "report_curves.png").stat().st_size > 1000
    r = json.loads((run / "eval.json").read_text())
    assert f"{r['perplexity']['sliding']['perplexity']:.2f}" in text  # the real numbers, not placeholders
    (run / "eval.json").unlink()
    assert main(["report", "--out_dir", str(run)]) == 0
    assert "Not evaluated yet: `python -m minilm.evaluate" in (run / "report.md").read_text()
    assert main(["report", "--out_dir", str(tmp_path / "nothing")]) == 2
    assert "lacks config.yaml, metrics.jsonl" in capsys.readouterr().err


def test_broken_run_dir_is_explained(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"not a checkpoint")
    (run / "config.yaml").write_text("preset: tiny\n")
    (run / "metrics.jsonl").write_text("")
    rows = status(tmp_path, run, log=tmp_path / "log.jsonl")
    assert not rows[3]["done"] and "not a readable checkpoint" in rows[3]["artifact"]
    (run / "eval.json").write_text("{broken")
    (run / "eval.md").write_text("# eval")
    assert "not valid JSON" in status(tmp_path, run, log=tmp_path / "log.jsonl")[4]["artifact"]


def test_cli(tiny_data_dir, tmp_path, capsys):
    log = tmp_path / "checks.jsonl"
    _write_log(log, {"minhash": True, "bpe": False})
    assert main(["status", "--data_dir", str(tiny_data_dir), "--out_dir", str(tmp_path / "run"),
                 "--target_tokens", "1000", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "[ ] task 1 Curation" in out and "minhash PASS" in out and "bpe FAIL" in out and "0 of 5 tasks done" in out
    assert "dup_lines not run" in out
    assert main(["status", "--json", "--log", str(log), "--data_dir", str(tiny_data_dir)]) == 0
    got = json.loads(capsys.readouterr().out)[0]["checks"]
    assert got["minhash"] == "PASS" and got["bpe"] == "FAIL" and got["bpe_encode"] is None
    assert main(["checks"]) == 0
    listed = capsys.readouterr().out
    assert "check.bleu: fn(hypotheses, references)" in listed
    assert all(f"check.{c}: " in listed for _, checks in TASKS.values() for c in checks)
    assert "not available" not in listed
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_the_shipped_benchmark_does_not_count_as_the_learners():
    # efficient_training/bench_results/ is committed (the course's recorded run); task 3 must look elsewhere.
    import inspect
    import subprocess
    from pathlib import Path

    default = inspect.signature(status).parameters["bench_dir"].default
    repo = Path(__file__).resolve().parents[1]
    committed = subprocess.run(["git", "ls-files", str(default)], cwd=repo, capture_output=True, text=True)
    assert committed.returncode == 0 and committed.stdout == "", committed.stdout
    assert subprocess.run(["git", "check-ignore", "-q", f"{default}/bench_x.json"], cwd=repo).returncode == 0
