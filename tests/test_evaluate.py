"""minilm.evaluate on the session's tiny trained run: files, one perplexity definition, a clean task, clear errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import stdlib_documents

from metrics.completion import normalized_lines
from metrics.perplexity import perplexity
from minilm.checkpoint import CheckpointError, model_from_checkpoint
from minilm.data import DataError, load_tokenizer
from minilm.evaluate import SYSTEMS, evaluate, main, report_markdown

SMALL = dict(num_prompts=40, function_prompts=10, function_tokens=48, line_tokens=24, kn_order=3, speed_tokens=8,
             max_train_tokens=100_000, bootstrap_samples=200, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A model this small decodes several times faster on one thread when the two cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def contaminated_val_dir(tiny_data_dir, tmp_path_factory):
    """The tiny data dir with val.bin = three held-out files plus one training file copied in."""
    out = tmp_path_factory.mktemp("evaldata") / "tiny_contaminated_val"
    shutil.copytree(tiny_data_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    all_docs = stdlib_documents()
    docs = [all_docs[0], all_docs[10], all_docs[20], all_docs[11]]  # 11 is in the training split (i % 10 != 0)
    ids = []
    for d in docs:
        ids += tok.encode(d).ids + [meta["eot_id"]]
    np.array(ids, dtype=np.uint16).tofile(out / "val.bin")
    meta["tokens"]["val"], meta["documents"]["val"] = len(ids), len(docs)
    meta["bytes"]["val"] = sum(len(d.encode("utf-8")) for d in docs)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_evaluate_report_numbers_and_task(tiny_run, contaminated_val_dir):
    r = evaluate(tiny_run, data_dir=contaminated_val_dir, stride=48, **SMALL)
    meta = json.loads((contaminated_val_dir / "meta.json").read_text())
    p = r["perplexity"]
    # The whole split, every token after the first, for the model and every baseline.
    assert p["whole_split"] and p["tokens"] == meta["tokens"]["val"] - 1
    for name in ("unigram", "bigram", "kn_full", "kn_seen"):
        assert r["baselines"][name]["tokens"] == p["tokens"], name
    # The headline is training's definition: non-overlapping block_size windows over the whole split.
    model, ckpt = model_from_checkpoint(tiny_run / "ckpt.pt")
    val = np.fromfile(contaminated_val_dir / "val.bin", dtype=np.uint16)
    direct = perplexity(lambda x: model(x)[0], val, model.config.block_size, model.config.block_size)
    assert p["non_overlapping"]["nll"] == pytest.approx(direct.nll, rel=1e-9)
    assert p["sliding"]["nll"] < p["non_overlapping"]["nll"]  # more context per token
    n = p["non_overlapping"]
    assert n["bits_per_byte"] == pytest.approx(n["nll_sum"] / (math.log(2) * p["bytes"]))
    # The text's bytes minus the first token's, plus one per end-of-text target (4 documents).
    assert 0 <= meta["bytes"]["val"] + 4 - p["bytes"] < 8
    # Kneser-Ney on the same tokens: the tiny run saw 40 x 8 x 64 = 20,480 training tokens.
    b = r["baselines"]
    assert b["seen_tokens"] == 40 * 8 * 64 == b["kn_seen"]["train_tokens"] and not b["kn_seen"]["same_as_full"]
    assert b["kn_full"]["train_tokens"] == 100_000 and b["kn_full"]["nll"] < b["bigram"]["nll"]

    t = r["task"]
    assert t["prompts"] == 40 and t["counts"]["function"]["chosen"] == 10
    assert t["counts"]["line"]["prompt_in_train"] > 50  # the copied training file was caught
    rows = [json.loads(line) for line in (tiny_run / "eval_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(set(SYSTEMS) <= set(row) for row in rows)
    tok = load_tokenizer(contaminated_val_dir)
    train_ids = np.fromfile(contaminated_val_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    train_text = "\n".join(normalized_lines(tok.decode(train_ids.tolist())))
    val_docs = [stdlib_documents()[i] for i in (0, 10, 20, 11)]  # as the fixture wrote them
    for row in rows:
        assert "\n".join(normalized_lines(row["prompt"])) not in train_text  # never a training prompt
        assert row["doc"] != 3  # nothing from the copied training file
        # "doc" is the source document: the prompt and reference are lines of that validation file.
        assert "\n".join(normalized_lines(row["prompt"] + "\n" + row["reference"])) in \
            "\n".join(normalized_lines(val_docs[row["doc"]]))
    # Every interval resamples those documents, and the paired differences too.
    assert t["documents"] == len({row["doc"] for row in rows}) >= 2
    diff = t["model_minus"]["kn_full"]["all"]
    for metric in ("exact", "edit_sim", "bleu", "chrf", "rougeL"):
        assert t["systems"]["model"]["all"][metric]["clusters"] == t["documents"], metric
        assert diff[metric]["clusters"] == t["documents"], metric
        assert diff[metric]["value"] == pytest.approx(t["systems"]["model"]["all"][metric]["value"]
                                                      - t["systems"]["kn_full"]["all"][metric]["value"]), metric
        assert diff[metric]["low"] <= diff[metric]["value"] <= diff[metric]["high"], metric
        assert 0 <= row["model"]["edit_sim"] <= 1 and row["model"]["exact"] in (0.0, 1.0)
    for name in SYSTEMS:
        agg = t["systems"][name]["all"]
        for metric in ("exact", "edit_sim", "bleu", "chrf", "rougeL"):
            assert agg[metric]["low"] <= agg[metric]["value"] <= agg[metric]["high"], (name, metric)
        assert agg["n"] == 40
    m = t["systems"]["model"]["all"]
    assert m["exact"]["value"] == pytest.approx(np.mean([row["model"]["exact"] for row in rows]))
    assert r["continuation"]["bleu"] == pytest.approx(m["bleu"]["value"])

    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["perplexity"]["non_overlapping"]["nll"] == n["nll"]
    md = (tiny_run / "eval.md").read_text()
    assert "## Bits per byte" in md and "## Completion task" in md and "Kneser-Ney" in md
    assert f"cluster bootstrap over the {t['documents']} validation files" in md and "Model minus baseline" in md
    assert "eval_dashboard.png" in md and (tiny_run / "eval_dashboard.png").stat().st_size > 10_000
    assert not list(tiny_run.glob(".eval*.tmp"))  # no temp files left behind


SMALL_TEXTS = ["def f(x):\n    return 'é' * x\n", "猫 = 1\nprint(猫, 'naïve')\n", "x = [1, 2]  # ok\n"]


@pytest.fixture(scope="module")
def small_text_dir(tiny_data_dir, tmp_path_factory):
    """The tiny data dir with val.bin = a few short documents (with multi-byte characters), each closed by EOT."""
    out = tmp_path_factory.mktemp("evaldata") / "tiny_small_val"
    shutil.copytree(tiny_data_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    docs = SMALL_TEXTS * 4  # 12 documents, more than one 64-token window
    ids = []
    for d in docs:
        assert tok.decode(tok.encode(d).ids) == d  # byte-level BPE: the tokens are exactly the text
        ids += tok.encode(d).ids + [meta["eot_id"]]
    np.array(ids, dtype=np.uint16).tofile(out / "val.bin")
    meta["tokens"]["val"], meta["documents"]["val"] = len(ids), len(docs)
    (out / "meta.json").write_text(json.dumps(meta))
    return out, docs


def test_bits_per_byte_by_hand_counts_each_end_of_text_as_one_byte(tiny_run, small_text_dir):
    data_dir, docs = small_text_dir
    r = evaluate(tiny_run, data_dir=data_dir, write=False, **{**SMALL, "num_prompts": 4, "function_prompts": 1})
    model, _ = model_from_checkpoint(tiny_run / "ckpt.pt")
    tok, eot = load_tokenizer(data_dir), json.loads((data_dir / "meta.json").read_text())["eot_id"]
    ids = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    W = model.config.block_size
    assert len(ids) > 2 * W
    # NLL of every target after the first token, non-overlapping windows of W, by hand from the logits.
    nll = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, W):
            y = ids[start + 1 : start + W + 1]
            logits = model(torch.from_numpy(ids[start : start + len(y)])[None])[0][0].double().numpy()
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            nll += list(lse - logits[np.arange(len(y)), y])
    assert len(nll) == len(ids) - 1
    # Bytes: the UTF-8 bytes of every document, less the unscored first token's, plus one per end-of-text target.
    first = len(tok.decode([int(ids[0])]).encode("utf-8"))
    n_eot = int((ids[1:] == eot).sum())
    assert n_eot == len(docs)  # every document is closed by one, and each is a scored target
    n_bytes = sum(len(d.encode("utf-8")) for d in docs) - first + n_eot
    assert sum(len(d) for d in docs) < n_bytes - len(docs) + first  # multi-byte characters are in the text
    p = r["perplexity"]
    assert p["bytes"] == n_bytes
    assert p["non_overlapping"]["nll"] == pytest.approx(np.mean(nll), rel=1e-6)
    assert p["non_overlapping"]["bits_per_byte"] == pytest.approx(sum(nll) / (math.log(2) * n_bytes), rel=1e-6)
    # The baselines score the same targets, end-of-text included, over the same bytes.
    for name in ("unigram", "bigram", "kn_full"):
        b = r["baselines"][name]
        assert b["bits_per_byte"] == pytest.approx(b["nll_sum"] / (math.log(2) * n_bytes), rel=1e-12), name


def test_headline_equals_trainings_final_val_loss(tiny_run, tiny_data_dir):
    # Training ends with the val loss over the whole split (metrics.jsonl: final_val_loss); evaluate's headline is
    # the same number on the same tokens with the same weights.
    r = evaluate(tiny_run, write=False, **{**SMALL, "num_prompts": 4, "function_prompts": 1})
    final = r["training_log"]["final_val_loss"]
    assert r["perplexity"]["whole_split"]
    assert r["perplexity"]["non_overlapping"]["nll"] == pytest.approx(final, rel=1e-6)
    assert "Training's final val loss" in report_markdown(r)


def test_same_prompts_and_completions_every_run(tiny_run, contaminated_val_dir):
    a = evaluate(tiny_run, data_dir=contaminated_val_dir, write=False, **{**SMALL, "num_prompts": 8})
    b = evaluate(tiny_run, data_dir=contaminated_val_dir, write=False, **{**SMALL, "num_prompts": 8})
    assert a["task"]["systems"] == b["task"]["systems"] and a["examples"] == b["examples"]


def test_cli_runs_with_small_flags(tiny_run):
    code = main(["--out_dir", str(tiny_run), "--max_tokens", "1500", "--num_prompts", "6", "--function_prompts", "2",
                 "--speed_tokens", "4", "--max_train_tokens", "50000", "--kn_order", "3", "--function_tokens", "24",
                 "--line_tokens", "16", "--bootstrap_samples", "50", "--quiet"])
    assert code == 0
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["task"]["prompts"] == 6 and not saved["perplexity"]["whole_split"]
    assert saved["perplexity"]["tokens"] < 1500


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
    assert main(["--out_dir", str(tiny_run), "--kn_order", "9", "--max_tokens", "500", "--quiet"]) == 2
    assert "order" in capsys.readouterr().err
