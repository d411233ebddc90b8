"""The course's evaluation as lm-evaluation-harness tasks, so any causal LM (a minilm export, a Hugging Face model, the
server) is scored on exactly this run's validation split.

    python -m minilm.lm_eval_tasks --out_dir out/tiny --tasks_dir out/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=hf/tiny --include_path out/lm_eval_tasks \\
        --tasks minilm_val_bpb,minilm_completion_ll,minilm_completion

writes into tasks_dir one YAML file per task, the JSONL files they read (`dataset_path: json` with `data_files`:
local files only, nothing from the Hub) and utils.py, which imports the scoring functions below (so this package
must be importable where lm-eval runs):

  minilm_val_bpb         loglikelihood_rolling over every validation document followed by its end-of-text token.
                         bits_per_byte = summed NLL / (ln 2 x (UTF-8 bytes + 1 per end-of-text)): the byte count of
                         minilm.evaluate.scored_bytes. lm-eval scores each document on its own, from an end-of-text
                         prefix, in windows of its max_length (docs/evaluation.md gives the difference this makes).
  minilm_completion_ll   log-likelihood of each completion-task reference ("\\n" + body or line) given its prompt,
                         for the references of at most half the context: acc = the reference is the greedy
                         continuation token by token; bits per byte of the references.
  minilm_completion      the completion task as minilm.evaluate runs it (greedy, the same stop rules and metrics:
                         exact match, edit similarity, ROUGE-L, BLEU and chrF from summed statistics, ast validity),
                         a group of minilm_completion_function and minilm_completion_line.

The prompts are minilm.evaluate's: the same completion_task call (seed, decontamination, token caps). lm-eval cuts a
prompt to the model's context minus the generation budget (minilm.evaluate keeps block_size - 16 tokens and slides
the window), so long prompts can score differently; the budget is minilm.evaluate's cap, at most half the context.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from metrics.chrf import chrf_from_stats
from metrics.completion import bleu_from_stats, cut_completion, score_pair
from minilm.checkpoint import atomic_write

TASKS = ("minilm_val_bpb", "minilm_completion_ll", "minilm_completion")
UTILS = ("# Written by python -m minilm.lm_eval_tasks: the scoring is the package's own, so lm-eval scores as\n"
         "# minilm.evaluate does.\n"
         "from minilm.lm_eval_tasks import (  # noqa: F401\n"
         "    bpb_results, completion_ll_results, completion_results, corpus_bleu, corpus_chrf, mean_defined)\n")


# ---------------------------------------------------------------------------------------------------------------
# Scoring, called by lm-eval through the tasks dir's utils.py.


def bpb_results(doc: dict, results: list) -> dict:
    """A document's (log-likelihood, bytes) for lm-eval's bits_per_byte and weighted_perplexity aggregations."""
    (loglikelihood,) = results
    return {"bits_per_byte": (loglikelihood, doc["bytes"]), "byte_perplexity": (loglikelihood, doc["bytes"])}


def completion_ll_results(doc: dict, results: list) -> dict:
    (loglikelihood, greedy), = results
    return {"acc": float(greedy), "bits_per_byte": (loglikelihood, len(doc["target"].encode("utf-8")))}


def completion_results(doc: dict, results: list) -> dict:
    """minilm.evaluate's scores of one generated continuation, cut by its kind's stop rule."""
    pred = cut_completion(doc["kind"], results[0])
    s = score_pair(doc["prompt"], pred, doc["reference"], doc["kind"])
    return {"exact": s["exact"], "edit_sim": s["edit_sim"], "rougeL": s["rougeL"], "ast_valid": s["ast_valid"],
            "bleu": s["bleu_stats"], "chrf": s["chrf_stats"]}


def corpus_bleu(items: list[list[int]]) -> float:
    """BLEU over code tokens from the examples' summed statistics (0-100), as minilm.evaluate reports it."""
    return bleu_from_stats(np.sum(np.asarray(items, dtype=np.int64), axis=0).tolist())


def corpus_chrf(items: list[list[float]]) -> float:
    return chrf_from_stats(np.sum(np.asarray(items, dtype=np.float64), axis=0).tolist())


def mean_defined(items: list[float | None]) -> float:
    """Mean over the examples that have the score (ast validity is only defined where the reference parses)."""
    got = [x for x in items if x is not None]
    return float(np.mean(got)) if got else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Writing the tasks dir.


def _data(path: Path) -> str:
    return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path.resolve()))}\n" \
           "test_split: test\n"


def _metric(name: str, aggregation: str, higher: bool) -> str:
    return f"  - metric: {name}\n    aggregation: {aggregation}\n    higher_is_better: {str(higher).lower()}\n"


def _jsonl(rows: list[dict], path: Path) -> None:
    atomic_write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), path)


def task_yamls(tasks_dir: Path, eot_text: str, caps: dict[str, int]) -> dict[str, str]:
    """File name -> YAML text of every task (and the completion group) reading the JSONL files in tasks_dir."""
    head = "# Written by python -m minilm.lm_eval_tasks; rerun it rather than editing.\n"
    out = {"minilm_val_bpb.yaml": head + "task: minilm_val_bpb\n" + _data(tasks_dir / "val_documents.jsonl") +
           "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
           "process_results: !function utils.bpb_results\nmetric_list:\n" +
           _metric("bits_per_byte", "bits_per_byte", False) + _metric("byte_perplexity", "weighted_perplexity", False)
           + "metadata:\n  version: 1.0\n",
           "minilm_completion_ll.yaml": head + "task: minilm_completion_ll\n" + _data(tasks_dir / "completion.jsonl") +
           "output_type: loglikelihood\ndoc_to_text: prompt\ndoc_to_target: target\ntarget_delimiter: \"\"\n"
           "process_results: !function utils.completion_ll_results\nmetric_list:\n" +
           _metric("acc", "mean", True) + _metric("bits_per_byte", "bits_per_byte", False) +
           "metadata:\n  version: 1.0\n"}
    for kind, cap in caps.items():
        out[f"minilm_completion_{kind}.yaml"] = (
            head + f"task: minilm_completion_{kind}\n" + _data(tasks_dir / f"completion_{kind}.jsonl") +
            "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: reference\n"
            f"generation_kwargs:\n  until: [{json.dumps(eot_text)}]\n  do_sample: false\n  temperature: 0.0\n"
            f"  max_gen_toks: {cap}\nprocess_results: !function utils.completion_results\nmetric_list:\n" +
            _metric("exact", "mean", True) + _metric("edit_sim", "mean", True) + _metric("rougeL", "mean", True) +
            _metric("bleu", "!function utils.corpus_bleu", True) + _metric("chrf", "!function utils.corpus_chrf", True)
            + _metric("ast_valid", "!function utils.mean_defined", True) + "metadata:\n  version: 1.0\n")
    out["minilm_completion.yaml"] = (
        head + "group: minilm_completion\ntask:\n" + "".join(f"  - minilm_completion_{k}\n" for k in caps) +
        "aggregate_metric_list:\n" + "".join(f"  - metric: {m}\n    aggregation: mean\n    weight_by_size: true\n"
                                             for m in ("exact", "edit_sim", "rougeL")) +
        "metadata:\n  version: 1.0\n")
    return out


def write_tasks(out_dir: str | Path, tasks_dir: str | Path, *, data_dir: str | Path | None = None,
                num_prompts: int = 360, function_prompts: int = 160, function_tokens: int = 128,
                line_tokens: int = 48, seed: int = 0, context: int | None = None) -> dict:
    """Write the tasks for the run in out_dir; returns {"tasks_dir", "documents", "bytes", "prompts", "caps"}.

    The arguments are minilm.evaluate's (same defaults, so the same prompts); context (default: the run's block_size)
    bounds the generation budget lm-eval gets, half of it at most, since lm-eval needs prompt + budget to fit.
    """
    from minilm.checkpoint import load_checkpoint
    from minilm.data import DataError, TokenData, load_tokenizer, read_meta
    from minilm.evaluate import completion_task, decode_documents

    out_dir = Path(out_dir)
    ckpt = load_checkpoint(out_dir)
    data_dir = Path(data_dir or ckpt["config"].get("train", {}).get("data_dir") or "")
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist; pass --data_dir (the run's data dir)")
    meta, tokenizer = read_meta(data_dir), load_tokenizer(out_dir if (out_dir / "tokenizer.json").is_file()
                                                          else data_dir)
    eot = meta.get("eot_id")
    if eot is None:
        raise DataError(f"{data_dir}/meta.json has no eot_id: the tasks need the end-of-text token")
    eot_text = tokenizer.id_to_token(eot)
    val = np.asarray(TokenData(data_dir, "val").tokens, dtype=np.int64)
    train = np.asarray(TokenData(data_dir, "train").tokens, dtype=np.int64)
    caps = {"function": function_tokens, "line": line_tokens}
    task = completion_task(tokenizer, train, val, eot, caps, num_prompts, function_prompts, seed)
    context = context or int(ckpt["config"]["model"]["block_size"])
    gen_caps = {k: max(1, min(c, context // 2)) for k, c in caps.items()}

    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    docs = [{"text": t + eot_text, "bytes": len(t.encode("utf-8")) + 1} for t in decode_documents(tokenizer, val, eot)]
    _jsonl(docs, tasks_dir / "val_documents.jsonl")
    rows = [{**{k: ex[k] for k in ("id", "kind", "doc", "prompt", "reference")}, "target": "\n" + ex["reference"]}
            for ex in task["examples"]]
    # lm-eval refuses a continuation longer than the context, and one near it would be scored with almost no prompt
    _jsonl([r for r in rows if len(tokenizer.encode(r["target"]).ids) <= context // 2], tasks_dir / "completion.jsonl")
    for kind in caps:
        _jsonl([r for r in rows if r["kind"] == kind], tasks_dir / f"completion_{kind}.jsonl")
    for name, text in task_yamls(tasks_dir, eot_text, gen_caps).items():
        atomic_write(text, tasks_dir / name)
    atomic_write(UTILS, tasks_dir / "utils.py")
    return {"tasks_dir": str(tasks_dir), "documents": len(docs), "bytes": sum(d["bytes"] for d in docs),
            "prompts": len(rows),
            "caps": gen_caps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minilm.lm_eval_tasks",
                                 description="Write lm-evaluation-harness tasks for a run's validation split")
    ap.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt")
    ap.add_argument("--tasks_dir", required=True, help="directory to write (pass it to lm_eval --include_path)")
    ap.add_argument("--data_dir", default=None, help="override the data dir stored in the checkpoint")
    ap.add_argument("--num_prompts", type=int, default=360, help="completion-task prompts (as minilm.evaluate)")
    ap.add_argument("--function_prompts", type=int, default=160)
    ap.add_argument("--function_tokens", type=int, default=128)
    ap.add_argument("--line_tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", type=int, default=None, help="context of the models to score (default: the "
                    "run's block_size); the generation budget is at most half of it")
    a = ap.parse_args(argv)
    from minilm.checkpoint import CheckpointError
    from minilm.data import DataError

    try:
        r = write_tasks(a.out_dir, a.tasks_dir, data_dir=a.data_dir, num_prompts=a.num_prompts,
                        function_prompts=a.function_prompts, function_tokens=a.function_tokens,
                        line_tokens=a.line_tokens, seed=a.seed, context=a.context)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['tasks_dir']}: {', '.join(TASKS)} ({r['documents']} validation documents, {r['bytes']:,} "
          f"bytes; {r['prompts']} completion prompts, generation budget {r['caps']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
