"""minilm.evaluate on the session's tiny trained run: the files, the numbers' bookkeeping, and clear errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import stdlib_documents

from minilm.checkpoint import CheckpointError
from minilm.data import DataError, load_tokenizer
from minilm.evaluate import evaluate, main

SMALL = dict(num_prompts=3, speed_tokens=8, max_train_tokens=100_000, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A model this small decodes several times faster on one thread when the two cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_val_dir(tiny_data_dir, tmp_path_factory):
    """The tiny data dir with val.bin replaced by four short documents whose exact text we know."""
    out = tmp_path_factory.mktemp("evaldata") / "tiny_small_val"
    shutil.copytree(tiny_data_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    docs = [d[:700] for d in stdlib_documents()[1:40:10]]
    ids = []
    for d in docs:
        ids += tok.encode(d).ids + [meta["eot_id"]]
    np.array(ids, dtype=np.uint16).tofile(out / "val.bin")
    meta["tokens"]["val"], meta["documents"]["val"] = len(ids), len(docs)
    meta["bytes"]["val"] = sum(len(d.encode("utf-8")) for d in docs)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_evaluate_writes_report_with_consistent_numbers(tiny_run, small_val_dir):
    r = evaluate(tiny_run, data_dir=small_val_dir, max_tokens=None, stride=48, **SMALL)
    meta = json.loads((small_val_dir / "meta.json").read_text())
    p = r["perplexity"]
    # Whole validation split after one leading end-of-text: every val token is scored once.
    assert p["tokens"] == meta["tokens"]["val"] == p["sliding"]["tokens"] == p["non_overlapping"]["tokens"]
    assert p["bytes"] == meta["bytes"]["val"]  # decoded text has exactly the bytes of the source documents
    s = p["sliding"]
    assert s["bits_per_byte"] == pytest.approx(s["nll_sum"] / (math.log(2) * p["bytes"]))
    assert s["perplexity"] == pytest.approx(math.exp(s["nll"]))
    assert r["baselines"]["bigram"]["tokens"] == p["tokens"]
    assert len(r["loss_by_position"]) == p["window"]
    c = r["continuation"]
    assert c["prompts"] == 3 and 0 <= c["bleu"] <= 100
    assert all(0 <= v["f_low"] <= v["f"] <= v["f_high"] <= 1 for v in c["rouge"].values())
    g = r["generation"]
    assert set(g) >= {"greedy", "sampled_t0.8_top50", "reference"}
    assert 0 < g["reference"]["distinct_1"] <= 1
    assert r["speed"]["tokens"] == 8 and r["speed"]["tokens_per_s"] > 0
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["perplexity"]["sliding"]["nll"] == s["nll"]
    md = (tiny_run / "eval.md").read_text()
    assert "## Perplexity" in md and "eval_dashboard.png" in md and "ROUGE" not in md.split("## Perplexity")[0]
    assert (tiny_run / "eval_dashboard.png").stat().st_size > 10_000
    assert not list(tiny_run.glob(".eval*.tmp"))  # no temp files left behind


def test_cli_runs_with_small_flags(tiny_run, capsys):
    code = main(["--out_dir", str(tiny_run), "--max_tokens", "1500", "--num_prompts", "2", "--speed_tokens", "4",
                 "--max_train_tokens", "50000", "--quiet"])
    assert code == 0
    assert json.loads((tiny_run / "eval.json").read_text())["continuation"]["prompts"] == 2


def test_errors_are_clear(tiny_run, tmp_path, capsys):
    assert main(["--out_dir", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tiny_run, data_dir=tmp_path / "nodata", **SMALL)
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        evaluate(tmp_path / "run", **SMALL)
    with pytest.raises(ValueError, match="longer than the model's context"):
        evaluate(tiny_run, window=10_000, **SMALL)
