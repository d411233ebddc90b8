"""lm-evaluation-harness on the course's own tasks (minilm.lm_eval_tasks), offline, against the exported model (`hf`)
and the server (`local-completions`): the same log-likelihoods as minilm's own forward pass, the same bytes as
minilm.evaluate, the same greedy completions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from metrics.perplexity import token_nll  # noqa: E402  (what minilm.evaluate scores tokens with)
from minilm.data import TokenData, read_meta  # noqa: E402
from minilm.evaluate import scored_bytes, split_documents  # noqa: E402
from minilm.export import export_model  # noqa: E402
from minilm.lm_eval_tasks import main as write_main  # noqa: E402
from minilm.sample import load_run  # noqa: E402
from minilm.serve import create_app, serve_in_thread  # noqa: E402

LIMIT = 2  # examples per task: enough for every code path, a few seconds each
# fp32 on the CPU in three programs (minilm, transformers, the server's engine): per-token log-probabilities agree
# to ~1e-6, so a sum over the few thousand tokens of a document to 1e-3.
ABS = 1e-3


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    model, tok, ckpt = load_run(tiny_run, "cpu")
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir = export_model(model, tiny_run / "tokenizer.json", root / "hf")
    tasks = root / "tasks"
    assert write_main(["--out_dir", str(tiny_run), "--tasks_dir", str(tasks), "--num_prompts", "12",
                       "--function_prompts", "4"]) == 0
    data_dir = ckpt["config"]["train"]["data_dir"]
    return {"model": model, "tok": tok, "eot": read_meta(data_dir)["eot_id"], "data_dir": data_dir, "hf": hf_dir,
            "tasks": tasks, "block": model.config.block_size, "run": tiny_run}


@pytest.fixture(scope="module")
def server(setup):
    app = create_app(setup["run"], max_concurrency=2, max_queue=8, max_new_tokens_cap=128)
    with serve_in_thread(app) as base:
        yield f"{base}/v1/completions"


def picks(setup) -> dict[str, list[int]]:
    """LIMIT examples of each task: the shortest validation documents (a rolling window is a request each), the
    first completion examples."""
    docs = (setup["tasks"] / "val_documents.jsonl").read_text().splitlines()
    shortest = sorted(range(len(docs)), key=lambda i: len(docs[i]))[:LIMIT]
    first = list(range(LIMIT))
    return {"minilm_val_bpb": shortest, "minilm_completion_ll": first, "minilm_completion_function": first,
            "minilm_completion_line": first}


def evaluate(setup, tasks: list[str], model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    chosen = {k: v for k, v in picks(setup).items() if any(k.startswith(t) for t in tasks)}
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, samples=chosen, batch_size=1,
                                   device="cpu", log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))


@pytest.fixture(scope="module")
def hf(setup):
    """Every task through the export; max_length B - 1 (see the tests for why)."""
    return evaluate(setup, ["minilm_val_bpb", "minilm_completion_ll", "minilm_completion"], "hf",
                    f"pretrained={setup['hf']},dtype=float32,max_length={setup['block'] - 1}")


def through_server(setup, url: str, tasks: list[str], max_length: int) -> dict:
    return evaluate(setup, tasks, "local-completions", f"base_url={url},tokenizer={setup['hf']},"
                    f"tokenizer_backend=huggingface,model=tiny,max_length={max_length},max_retries=1")


def loglikelihoods(out: dict, task: str) -> list[float]:
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [float(np.ravel(s["filtered_resps"][0] if task == "minilm_completion_ll" else s["filtered_resps"])[0])
            for s in rows]


@torch.no_grad()
def minilm_nll(model, inputs: list[int], targets: list[int], scored: int) -> float:
    """NLL of the last `scored` targets of one forward pass over `inputs`, as minilm.evaluate computes it."""
    logits, _ = model(torch.tensor([inputs]))
    return float(token_nll(logits, torch.tensor([targets]))[0, -scored:].sum())


def rolling_nll(model, ids: list[int], prefix: int, window: int) -> float:
    """NLL of every token of ids from a `prefix` token, in lm-eval's rolling windows of `window` predictions: each
    window sees the tokens before it in the window, the last one a whole window of context."""
    s, total, start = [prefix, *ids], 0.0, 1
    while start < len(s):
        end = min(start + window, len(s))
        lo = max(0, end - 1 - window)
        total += minilm_nll(model, s[lo : end - 1], s[lo + 1 : end], end - start)
        start = end
    return total


def test_the_tasks_dir_holds_the_validation_split_with_minilm_evaluates_bytes(setup):
    tasks, tok, eot = setup["tasks"], setup["tok"], setup["eot"]
    names = {p.name for p in tasks.iterdir()}
    assert {"minilm_val_bpb.yaml", "minilm_completion_ll.yaml", "minilm_completion.yaml", "utils.py",
            "val_documents.jsonl", "completion.jsonl"} <= names
    docs = [json.loads(line) for line in (tasks / "val_documents.jsonl").read_text().splitlines()]
    val = np.asarray(TokenData(setup["data_dir"], "val").tokens, dtype=np.int64)
    want = split_documents(val, eot)
    assert len(docs) == len(want)
    for doc, ids in zip(docs, want):  # each document's text is its tokens, its end-of-text included
        assert tok.encode(doc["text"]).ids == [*ids.tolist(), eot]
    # lm-eval scores every token of the split from an end-of-text prefix; minilm.evaluate counts the same bytes
    # for those targets (UTF-8 bytes + 1 per end-of-text)
    assert sum(d["bytes"] for d in docs) == scored_bytes(tok, np.concatenate([[eot], val]), eot)
    every = {r["id"]: r for kind in ("function", "line")
             for r in map(json.loads, (tasks / f"completion_{kind}.jsonl").read_text().splitlines())}
    assert len(every) == 12 and all(r["target"] == "\n" + r["reference"] for r in every.values())
    scored = [json.loads(line) for line in (tasks / "completion.jsonl").read_text().splitlines()]
    assert all(every[r["id"]] == r for r in scored)
    assert {r["id"] for r in scored} == {i for i, r in every.items() if len(tok.encode(r["target"]).ids) <= 32}
    assert len(scored) >= LIMIT
    assert "max_gen_toks: 32" in (tasks / "minilm_completion_function.yaml").read_text()  # half of block_size 64


def test_loglikelihoods_through_the_server_equal_hf_and_minilms_own(setup, server, hf):
    """lm-eval's local-completions always asks for one generated token, so it keeps max_length - 2 positions for a
    rolling window, hf max_length: max_length B + 1 and B - 1 give both windows of B - 1 predictions."""
    B, model, tok, eot = setup["block"], setup["model"], setup["tok"], setup["eot"]
    tasks = ["minilm_val_bpb", "minilm_completion_ll"]
    api = through_server(setup, server, tasks, B + 1)
    for task in tasks:
        assert len(loglikelihoods(api, task)) == LIMIT and all(v < 0 for v in loglikelihoods(api, task))
        assert loglikelihoods(api, task) == pytest.approx(loglikelihoods(hf, task), abs=ABS), task

    lines = (setup["tasks"] / "val_documents.jsonl").read_text().splitlines()
    docs = [json.loads(lines[i]) for i in sorted(picks(setup)["minilm_val_bpb"])]
    ours = [-rolling_nll(model, tok.encode(d["text"]).ids, eot, B - 1) for d in docs]
    assert max(len(tok.encode(d["text"]).ids) for d in docs) > B  # more than one window
    assert loglikelihoods(api, "minilm_val_bpb") == pytest.approx(ours, abs=ABS)
    nbytes = sum(d["bytes"] for d in docs)
    for out in (hf, api):  # lm-eval's figure is summed NLL / (ln 2 x minilm.evaluate's bytes)
        bpb = out["results"]["minilm_val_bpb"]["bits_per_byte,none"]
        assert bpb == pytest.approx(-sum(ours) / (math.log(2) * nbytes), rel=1e-5)

    rows = [json.loads(line) for line in (setup["tasks"] / "completion.jsonl").read_text().splitlines()][:LIMIT]
    ours = []
    for r in rows:  # the whole text's tokens, the continuation the ones after the prompt's, cut to the context
        ids = tok.encode(r["prompt"] + r["target"]).ids
        n = len(ids) - len(tok.encode(r["prompt"]).ids)
        ids = ids[-B:]
        ours.append(-minilm_nll(model, ids[:-1], ids[1:], n))
    assert loglikelihoods(api, "minilm_completion_ll") == pytest.approx(ours, abs=ABS)


def test_greedy_completions_through_the_server_equal_hf(setup, server, hf):
    """Both keep max_length - max_gen_toks prompt tokens when max_length is B - 1 for hf and B for the server."""
    api = through_server(setup, server, ["minilm_completion"], setup["block"])
    for kind in ("function", "line"):
        task = f"minilm_completion_{kind}"
        got = {s["doc_id"]: s["resps"][0][0] for s in api["samples"][task]}
        want = {s["doc_id"]: s["resps"][0][0] for s in hf["samples"][task]}
        assert got == want and len(got) == LIMIT and any(got.values()), task
        for metric in ("exact", "edit_sim", "rougeL", "bleu", "chrf"):
            assert api["results"][task][f"{metric},none"] == hf["results"][task][f"{metric},none"]
    assert 0 <= api["results"]["minilm_completion"]["edit_sim,none"] <= 1


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert write_main(["--out_dir", str(tmp_path / "nope"), "--tasks_dir", str(tmp_path / "tasks")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err and not (tmp_path / "tasks").exists()
