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


def test_tasks_done_from_artifacts_and_log(tiny_data_dir, tiny_run, tmp_path):
    log = tmp_path / "checks.jsonl"
    every = {c: True for _, checks in TASKS.values() for c in checks}
    _write_log(log, every)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rows = status(tiny_data_dir, run, target_tokens=1000, log=log)
    assert [r["done"] for r in rows] == [True, True, True, True, False]  # no eval.json yet
    assert "tokens (target 1,000)" in rows[0]["artifact"] and "best val loss" in rows[3]["artifact"]
    (run / "eval.json").write_text(json.dumps({"perplexity": 12.3}))
    assert all(r["done"] for r in status(tiny_data_dir, run, target_tokens=1000, log=log))

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


def test_broken_run_dir_is_explained(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"not a checkpoint")
    rows = status(tmp_path, run, log=tmp_path / "log.jsonl")
    assert not rows[3]["done"] and "not a readable checkpoint" in rows[3]["artifact"]
    (run / "eval.json").write_text("{broken")
    assert "not valid JSON" in status(tmp_path, run, log=tmp_path / "log.jsonl")[4]["artifact"]


def test_cli(tiny_data_dir, tmp_path, capsys):
    log = tmp_path / "checks.jsonl"
    _write_log(log, {"minhash": True, "bpe": False})
    assert main(["status", "--data_dir", str(tiny_data_dir), "--out_dir", str(tmp_path / "run"),
                 "--target_tokens", "1000", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "[ ] task 1 Curation" in out and "minhash PASS, bpe FAIL" in out and "0 of 5 tasks done" in out
    assert main(["status", "--json", "--log", str(log), "--data_dir", str(tiny_data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["checks"] == {"minhash": "PASS", "bpe": "FAIL"}
    assert main(["checks"]) == 0
    assert "check.bleu: fn(hypotheses, references)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])
