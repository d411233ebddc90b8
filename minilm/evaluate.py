"""Evaluate a trained run: bits per byte against counting baselines, a code-completion task, generation, speed.

    python -m minilm.evaluate --out_dir out/tiny
    python -m minilm.evaluate --out_dir out/tiny --max_tokens 20000 --num_prompts 40 --max_train_tokens 1000000  # quick

Writes out_dir/eval.json (every number), eval_examples.jsonl (every task example: prompt, reference, each
system's completion and scores), eval.md (the report) and eval_dashboard.png.
From Python: `from minilm.evaluate import evaluate; results = evaluate("out/tiny")`.

Everything is measured on the validation split, on the same tokens for every system:
  - perplexity and bits per byte (the headline: it compares tokenizers) of the model on the whole split cut
    into non-overlapping block_size windows: the definition of training's final val loss, so the two agree.
    Every token after the first is a target, end-of-text tokens included, and bits per byte divides their
    summed NLL by the text's UTF-8 bytes plus one byte per end-of-text (the document separator; scored_bytes).
    A sliding window (stride block_size // 2) is reported beside it: every token but the first window's
    then sees at least half a window of context, so it is lower; it is the better estimate of the model, the
    non-overlapping one the comparable one;
  - baselines on those tokens: unigram and bigram add-k, and interpolated Kneser-Ney (order 5) counted on the
    training tokens the model saw (the first steps x tokens-per-step of train.bin: as many tokens as the model
    trained on, from the same split; the sampler's random windows themselves are not replayed) and on the
    whole training split;
  - a completion task (metrics.completion): >= 300 prompts from validation files whose prompts never occur in
    a training file: signature + docstring -> body, and 8 lines -> the next line. Greedy decoding for the
    model and for the counting baselines, the same stop rules and token caps, scored with exact match, edit
    similarity, BLEU over code tokens, chrF, ROUGE-L and ast validity, each with a 95% cluster-bootstrap
    interval that resamples the validation files the prompts come from (a file's prompts are not independent),
    and the model's paired difference from each baseline, resampled the same way. Each example's file is
    "doc" in eval_examples.jsonl (its index among the validation documents, in val.bin order);
  - generation metrics of the model's completions next to the references' (distinct-n, repetition, copies of
    16+ training tokens), and decoding speed with the KV cache.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metrics.baselines import bigram_perplexity, fit_add_k, greedy_next_tables, unigram_perplexity
from metrics.completion import (
    TrainIndex,
    aggregate,
    build_task,
    compare,
    corpus_bleu_code,
    cut_completion,
    is_finished,
    score_examples,
)
from metrics.generation import NgramIndex, distinct_n, repetition_rate, self_bleu
from metrics.kneser_ney import KneserNey
from metrics.perplexity import perplexity, token_nll
from minilm.checkpoint import CheckpointError, atomic_write, model_from_checkpoint
from minilm.data import DataError, TokenData, load_tokenizer, read_meta
from minilm.inference import generate_stream
from minilm.sample import pick_device

SYSTEMS = ("model", "kn_full", "kn_seen", "bigram", "unigram")
SYSTEM_NAMES = {"model": "model (greedy)", "kn_full": "Kneser-Ney, whole train split",
                "kn_seen": "Kneser-Ney, tokens seen", "bigram": "bigram add-k", "unigram": "unigram add-k"}
CHECK_EVERY = 8  # decode and test the stop rule every this many generated tokens


def split_documents(ids: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], ends + 1])
    return [ids[s:e] for s, e in zip(starts, np.concatenate([ends, [len(ids)]])) if e > s]


def val_tokens(val: np.ndarray, eot: int, max_tokens: int | None) -> np.ndarray:
    """The whole validation split, or its first max_tokens cut back to a document end."""
    ids = np.asarray(val[:max_tokens] if max_tokens else val, dtype=np.int64)
    if max_tokens and len(val) > max_tokens:
        ends = np.flatnonzero(ids == eot)
        if len(ends) and ends[-1] > 0:
            ids = ids[: ends[-1] + 1]
    return ids


def scored_bytes(tokenizer, ids: np.ndarray, eot: int) -> int:
    """The bytes bits per byte divides by: those of the text ids[1:] encode, one per end-of-text token included.

    Bits per byte = (NLL summed over the targets ids[1:]) / (ln 2 x these bytes). Every scored target is counted:
    a text token by its UTF-8 bytes, an end-of-text token as one byte, the separator that closes its document.
    The EOT is scored because predicting where a file ends is part of the model (training's loss, and so the
    perplexity here, include it); charging its loss to zero bytes would inflate bits per byte by the EOT's
    loss / text bytes, more for short documents. Counted as one byte, the numerator and denominator describe the
    same stream: the split as bytes with a one-byte separator between documents, which is also what a byte-level
    model would have to predict. The count of separators is the number of documents whatever the tokenizer,
    so the figure stays comparable across tokenizers.
    """
    targets = np.asarray(ids[1:], dtype=np.int64)
    text = tokenizer.decode(targets[targets != eot].tolist())
    return len(text.encode("utf-8")) + int((targets == eot).sum())


def completion_task(tokenizer, train_ids: np.ndarray, val_ids: np.ndarray, eot: int, caps: dict, num_prompts: int,
                    function_prompts: int, seed: int) -> dict:
    """The completion task's examples from the validation documents, decontaminated against every training one.

    caps (kind -> token cap) drops examples whose reference would not fit; minilm.lm_eval_tasks calls this too,
    so lm-eval scores exactly these prompts.
    """
    fits = lambda ex: len(tokenizer.encode("\n" + ex["reference"]).ids) <= caps[ex["kind"]] - 2
    index = TrainIndex(decode_documents(tokenizer, train_ids, eot))
    return build_task(decode_documents(tokenizer, val_ids, eot), index, n_total=num_prompts,
                      n_function=min(function_prompts, num_prompts), seed=seed, fits=fits)


def tokens_seen(ckpt: dict) -> int:
    """Training tokens the run consumed: steps x batch_size x grad_accum x block_size."""
    c = ckpt["config"]
    t, m = c.get("train", {}), c.get("model", {})
    return int(ckpt.get("step") or 0) * int(t.get("batch_size", 0)) * int(t.get("grad_accum", 1)) * \
        int(m.get("block_size", 0))


@torch.no_grad()
def loss_by_position(model, ids: np.ndarray, window: int, max_windows: int = 128, batch: int = 8) -> list[float]:
    """Mean next-token loss at each position of a window: how much the model gains from more context."""
    n = min(max_windows, (len(ids) - 1) // window)
    if n == 0:
        return []
    t = torch.from_numpy(ids[: n * window + 1]).to(next(model.parameters()).device)
    x, y = t[:-1].view(n, window), t[1:].view(n, window)
    losses = []
    for i in range(0, n, batch):
        logits, _ = model(x[i : i + batch])
        losses.append(token_nll(logits, y[i : i + batch]))
    return torch.cat(losses).mean(0).tolist()


def decode_documents(tokenizer, ids: np.ndarray, eot: int) -> list[str]:
    return tokenizer.decode_batch([d.tolist() for d in split_documents(np.asarray(ids, dtype=np.int64), eot)])


def _finish(tokenizer, ids: list[int], eot: int) -> str:
    return tokenizer.decode(ids[: ids.index(eot)] if eot in ids else ids)


@torch.no_grad()
def model_completions(model, prompts: list[list[int]], kinds: list[str], caps: dict, tokenizer, eot: int,
                      device, batch_size: int = 16) -> tuple[list[str], float]:
    """Greedy continuations, batched by kind and length with left padding, each stopped by its kind's rule.

    Stopping a row early changes nothing: greedy decoding is deterministic and the answer is cut by the same
    rule afterwards; it only saves the steps. Returns (raw continuation texts, seconds).
    """
    texts = [""] * len(prompts)
    t0 = time.perf_counter()
    for kind in ("function", "line"):
        rows = sorted((i for i, k in enumerate(kinds) if k == kind), key=lambda i: len(prompts[i]))
        for b in range(0, len(rows), batch_size):
            group = rows[b : b + batch_size]
            width = max(len(prompts[i]) for i in group)
            idx = torch.full((len(group), width), eot, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, i in enumerate(group):
                idx[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            new: list[list[int]] = [[] for _ in group]
            done = [False] * len(group)
            stream = generate_stream(model, idx.to(device), caps[kind], temperature=0.0, eos_id=eot,
                                     attention_mask=mask.to(device))
            for step, col in enumerate(stream, 1):
                for r, t in enumerate(col.tolist()):
                    new[r].append(t)
                if step % CHECK_EVERY == 0:
                    for r in range(len(group)):
                        done[r] = done[r] or eot in new[r] or is_finished(kind, tokenizer.decode(new[r]))
                    if all(done):
                        break
            for r, i in enumerate(group):
                texts[i] = _finish(tokenizer, new[r], eot)
    return texts, time.perf_counter() - t0


def count_completions(next_token, prompts: list[list[int]], kinds: list[str], caps: dict, tokenizer,
                      eot: int) -> list[str]:
    """Greedy continuations of a counting model, next_token(sequence) -> id, with the same stop rules."""
    texts = []
    for prompt, kind in zip(prompts, kinds):
        seq, new = list(prompt), []
        for step in range(1, caps[kind] + 1):
            t = next_token(seq)
            seq.append(t)
            new.append(t)
            if t == eot or (step % CHECK_EVERY == 0 and is_finished(kind, tokenizer.decode(new))):
                break
        texts.append(_finish(tokenizer, new, eot))
    return texts


def generation_metrics(seqs: list[list[int]], texts: list[str], index: NgramIndex | None) -> dict:
    out = {"distinct_1": distinct_n(seqs, 1), "distinct_2": distinct_n(seqs, 2),
           "repetition_4": repetition_rate(seqs, 4),
           "self_bleu": self_bleu(texts) if len(texts) > 1 else None,
           "mean_tokens": float(np.mean([len(s) for s in seqs])) if seqs else 0.0}
    if index is not None:
        stats = index.copy_stats(seqs)
        out["copy_rate"], out["copy_ngram_overlap"] = stats["copy_rate"], stats["ngram_overlap"]
    return out


@torch.no_grad()
def generation_speed(model, eot: int, new_tokens: int, device) -> dict:
    """Batch-1 greedy decoding with the KV cache from a one-token prompt, after a short warm-up."""
    new_tokens = max(2, new_tokens)
    idx = torch.tensor([[eot]], dtype=torch.long, device=device)
    for _ in generate_stream(model, idx, 4, temperature=0.0):
        pass
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in generate_stream(model, idx, new_tokens, temperature=0.0):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"tokens": n, "time_to_first_token_ms": 1000 * first, "tokens_per_s": n / total,
            "ms_per_token": 1000 * (total - first) / max(n - 1, 1)}


def last_training_eval(out_dir: Path) -> dict:
    """The latest val-loss fields training wrote to metrics.jsonl (val_*, final_val_loss, ...; empty if none)."""
    path = out_dir / "metrics.jsonl"
    last: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            fields = {k: v for k, v in row.items() if k.startswith("val_") or k.endswith("val_loss")}
            if fields:
                last.update({"step": row.get("step"), **fields})
    return last


def check_arguments(out_dir: Path, num_prompts: int, function_prompts: int, function_tokens: int, line_tokens: int,
                    kn_order: int) -> None:
    """Fail on a missing run dir or an unusable task size before loading anything."""
    if not out_dir.is_dir():
        raise CheckpointError(f"run dir {out_dir} does not exist; train first: python -m minilm.train "
                              f"--out_dir {out_dir}")
    if num_prompts < 1 or function_prompts < 0:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1 and function_prompts={function_prompts} >= 0")
    if function_tokens < 8 or line_tokens < 8:
        raise ValueError(f"function_tokens={function_tokens} and line_tokens={line_tokens} must be >= 8 "
                         "(the caps on generated tokens per example)")
    if not isinstance(kn_order, int) or not 1 <= kn_order <= 6:
        raise ValueError(f"kn_order={kn_order!r} must be an integer from 1 to 6 (3 to 5 is usual)")


def run_data_dir(out_dir: Path, data_dir: str | Path | None, ckpt: dict) -> Path:
    """data_dir, or the one the checkpoint was trained on; it must exist."""
    data_dir = data_dir or ckpt["config"].get("train", {}).get("data_dir")
    if not data_dir:
        raise DataError(f"the checkpoint in {out_dir} does not record its data dir; pass --data_dir")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist (relative paths count from the current directory); "
                        "pass --data_dir (evaluate(..., data_dir=...)) pointing at the run's data dir")
    return data_dir


def eot_id(meta: dict, tokenizer, data_dir: Path) -> int:
    """The end-of-text id: meta.json's, else the tokenizer's token (older data dirs do not record it)."""
    eot = meta.get("eot_id")
    if eot is None:
        eot = tokenizer.token_to_id(meta.get("eot_token", "<|endoftext|>"))
    if eot is None:
        raise DataError(f"{data_dir}/meta.json has no eot_id and the tokenizer has no <|endoftext|> token")
    return eot


def window_and_stride(block_size: int, window: int | None, stride: int | None) -> tuple[int, int]:
    """The perplexity window (default: block_size) and sliding stride (default: half the window)."""
    window = window or block_size
    if window > block_size:
        raise ValueError(f"window={window} is longer than the model's context (block_size={block_size})")
    stride = stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"stride={stride} is larger than window={window}; use stride <= window")
    return window, stride


def set_up(out_dir: Path, data_dir: str | Path | None, device: str, best: bool, window: int | None,
           stride: int | None, max_train_tokens: int | None, progress: bool) -> EvalRun:
    """Load the checkpoint, its data dir and tokenizer, and check that they belong together."""
    device = pick_device(device)
    started = time.perf_counter()
    checkpoint = "ckpt_best.pt" if best else "ckpt.pt"
    model, ckpt = model_from_checkpoint(out_dir / checkpoint, device)
    cfg = model.config
    data_dir = run_data_dir(out_dir, data_dir, ckpt)
    meta = read_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    if meta["vocab_size"] > cfg.vocab_size:
        raise DataError(f"{data_dir} has a {meta['vocab_size']}-token vocabulary but the model only "
                        f"{cfg.vocab_size}: this is not the data dir the run was trained on; pass --data_dir")
    eot = eot_id(meta, tokenizer, data_dir)
    window, stride = window_and_stride(cfg.block_size, window, stride)
    val_all = TokenData(data_dir, "val").tokens
    train_all = np.asarray(TokenData(data_dir, "train").tokens, dtype=np.int64)
    train = train_all[:max_train_tokens] if max_train_tokens else train_all
    return EvalRun(out_dir, checkpoint, device, model, ckpt, data_dir, tokenizer, eot, window, stride, val_all,
                   train_all, train, print if progress else (lambda *a, **k: None), started)


def scored_val(run: EvalRun, max_tokens: int | None) -> tuple[np.ndarray, int | None]:
    """The validation tokens every system scores, and their bytes (None if they decode to no text)."""
    val = val_tokens(run.val_all, run.eot, max_tokens)
    if len(val) < 2:
        raise DataError(f"{run.data_dir}/val.bin holds {len(val)} token(s); rebuild the data dir with more text")
    n_bytes = scored_bytes(run.tokenizer, val, run.eot) or None
    run.say(f"evaluating {run.out_dir} (step {run.ckpt.get('step')}) on {len(val) - 1:,} validation tokens, "
            f"{n_bytes or 0:,} bytes, device {run.device}")
    return val, n_bytes


def model_perplexity(run: EvalRun, val: np.ndarray, n_bytes: int | None, batch_size: int,
                     progress: bool) -> tuple[dict, list[float]]:
    """eval.json's "perplexity" (non-overlapping and sliding windows) and the model's loss by position."""
    window, stride = run.window, run.stride
    t0 = time.perf_counter()
    fn = lambda ids: run.model(ids)[0]
    chunks = perplexity(fn, val, window, window, byte_count=n_bytes, batch_size=batch_size, device=run.device,
                        progress=progress)
    sliding = perplexity(fn, val, window, stride, byte_count=n_bytes, batch_size=batch_size, device=run.device,
                         progress=progress) if stride < window else chunks
    by_pos = loss_by_position(run.model, val, window)
    run.timings["model_perplexity"] = time.perf_counter() - t0
    whole = len(val) == len(run.val_all)
    out = {"window": window, "stride": stride, "tokens": chunks.tokens, "bytes": n_bytes,
           "whole_split": whole, "non_overlapping": chunks.as_dict(), "sliding": sliding.as_dict(),
           "definition": f"val.bin{'' if whole else ' (first documents)'} scored from its 2nd token; "
                         f"non_overlapping = windows of {window} (training's final val loss); "
                         f"sliding = stride {stride}; bytes = UTF-8 bytes of the scored text + 1 per "
                         "end-of-text target (the document separator)"}
    return out, by_pos


def counting_baselines(run: EvalRun, val: np.ndarray, n_bytes: int | None,
                       kn_order: int) -> tuple[dict, KneserNey, KneserNey]:
    """eval.json's "baselines" on the same tokens, and the two Kneser-Ney models (whole split, tokens seen)."""
    train, V = run.train, run.model.config.vocab_size
    t0 = time.perf_counter()
    k1, k2 = fit_add_k(train, V, 1), fit_add_k(train, V, 2)
    uni = unigram_perplexity(train, val, V, k=k1, byte_count=n_bytes)
    bi = bigram_perplexity(train, val, V, k=k2, byte_count=n_bytes)
    seen = min(tokens_seen(run.ckpt), len(train))
    kn_full = KneserNey(train, V, order=kn_order)
    # The run saw only its first steps x tokens-per-step; fewer than an n-gram's worth would leave KN nothing.
    kn_seen = kn_full if seen >= len(train) else KneserNey(train[: max(seen, kn_order + 1)], V, order=kn_order)
    knf, kns = kn_full.perplexity(val, n_bytes), kn_seen.perplexity(val, n_bytes)
    run.timings["baselines"] = time.perf_counter() - t0
    out = {"unigram": {**uni.as_dict(), "k": k1}, "bigram": {**bi.as_dict(), "k": k2},
           "kn_full": {**knf.as_dict(), "order": kn_order, "train_tokens": kn_full.train_tokens,
                       "discounts": kn_full.discount},
           "kn_seen": {**kns.as_dict(), "order": kn_order, "train_tokens": kn_seen.train_tokens,
                       "same_as_full": kn_seen is kn_full},
           "train_tokens": len(train), "seen_tokens": tokens_seen(run.ckpt)}
    return out, kn_full, kn_seen


def say_bits_per_byte(run: EvalRun, p: dict, b: dict) -> None:
    bpb = lambda x: x["bits_per_byte"] or float("nan")
    run.say(f"bits per byte: model {bpb(p['non_overlapping']):.3f} (non-overlapping {run.window}), "
            f"{bpb(p['sliding']):.3f} (sliding, stride {run.stride}); KN-{b['kn_full']['order']} "
            f"{bpb(b['kn_full']):.3f} (whole train), {bpb(b['kn_seen']):.3f} "
            f"(tokens seen); bigram {bpb(b['bigram']):.3f}, unigram {b['unigram']['bits_per_byte'] or 0:.3f}")


def task_examples(run: EvalRun, caps: dict, num_prompts: int, function_prompts: int,
                  seed: int) -> tuple[dict, list[dict]]:
    """The completion task's examples and the start of eval.json's "task" (its systems still empty)."""
    t0 = time.perf_counter()
    prompt_cap = max(8, run.model.config.block_size - 16)
    task = completion_task(run.tokenizer, run.train_all, run.val_all, run.eot, caps, num_prompts, function_prompts,
                           seed)
    run.timings["task_build"] = time.perf_counter() - t0
    task_out = {"prompts": len(task["examples"]), "counts": task["counts"], "caps": caps,
                "prompt_token_cap": prompt_cap, "val_documents": task["val_documents"],
                "train_documents": task["train_documents"],
                "bleu_tokenize": "code tokens (identifiers, numbers, single punctuation), sacrebleu "
                                 "tokenize='none' over them", "systems": {}}
    return task_out, task["examples"]


def raw_completions(run: EvalRun, prompts: list[list[int]], kinds: list[str], caps: dict, kn_full: KneserNey,
                    kn_seen: KneserNey) -> dict[str, list[str]]:
    """Every system's greedy continuation of every prompt, before the stop rule cuts it."""
    tokenizer, eot = run.tokenizer, run.eot
    raw, gen_s = model_completions(run.model, prompts, kinds, caps, tokenizer, eot, run.device)
    run.timings["model_generation"] = gen_s
    raws = {"model": raw}
    t0 = time.perf_counter()
    uni_next, bi_next = greedy_next_tables(run.train, run.model.config.vocab_size)
    counters = {"kn_full": lambda s: int(np.argmax(kn_full.next_probs(s))),
                "bigram": lambda s: int(bi_next[s[-1]]), "unigram": lambda s: uni_next}
    if kn_seen is not kn_full:
        counters["kn_seen"] = lambda s: int(np.argmax(kn_seen.next_probs(s)))
    for name, nxt in counters.items():
        raws[name] = count_completions(nxt, prompts, kinds, caps, tokenizer, eot)
    if "kn_seen" not in raws:  # the same model: the same completions
        raws["kn_seen"] = raws["kn_full"]
    run.timings["baseline_generation"] = time.perf_counter() - t0
    return raws


def score_task(examples: list[dict], raws: dict[str, list[str]], task_out: dict, bootstrap_samples: int,
               seed: int) -> tuple[dict, dict]:
    """Cut and score every system's completions into task_out; returns (rows, preds) by system."""
    kinds = [ex["kind"] for ex in examples]
    rows: dict[str, list[dict]] = {}
    preds: dict[str, list[str]] = {}
    for name in SYSTEMS:
        preds[name] = [cut_completion(k, r) for k, r in zip(kinds, raws[name])]
        rows[name] = score_examples(examples, preds[name])
        task_out["systems"][name] = aggregate(examples, rows[name], bootstrap_samples, seed)
    task_out["documents"] = len({ex["doc"] for ex in examples})
    task_out["interval"] = (f"95% percentile cluster bootstrap, {bootstrap_samples} resamples of the "
                            f"{task_out['documents']} validation files the prompts come from")
    task_out["model_minus"] = {name: compare(examples, rows["model"], rows[name], bootstrap_samples, seed)
                               for name in SYSTEMS[1:]}
    return rows, preds


def run_task(run: EvalRun, caps: dict, num_prompts: int, function_prompts: int, kn_full: KneserNey,
             kn_seen: KneserNey, bootstrap_samples: int, seed: int) -> tuple[dict, list[dict], dict, dict]:
    """The completion task: eval.json's "task", its examples, and each system's score rows and predictions."""
    task_out, examples = task_examples(run, caps, num_prompts, function_prompts, seed)
    if not examples:
        task_out["skipped"] = "no usable example in the validation split (too few Python files that parse)"
        run.say(f"task skipped: {task_out['skipped']}")
        return task_out, examples, {}, {}
    kinds = [ex["kind"] for ex in examples]
    cap = task_out["prompt_token_cap"]
    prompts = [run.tokenizer.encode(ex["prompt"]).ids[-cap:] or [run.eot] for ex in examples]
    raws = raw_completions(run, prompts, kinds, caps, kn_full, kn_seen)
    rows, preds = score_task(examples, raws, task_out, bootstrap_samples, seed)
    task_out["prompt_tokens_mean"] = float(np.mean([len(p) for p in prompts]))
    m = task_out["systems"]["model"]["all"]
    run.say(f"task ({len(examples)} prompts): model exact {m['exact']['value']:.3f}, edit sim "
            f"{m['edit_sim']['value']:.3f}, BLEU {m['bleu']['value']:.2f}, chrF {m['chrf']['value']:.2f}; KN "
            f"edit sim {task_out['systems']['kn_full']['all']['edit_sim']['value']:.3f}")
    return task_out, examples, rows, preds


def completion_text_metrics(run: EvalRun, examples: list[dict], preds: dict, task_out: dict, copy_n: int,
                            function_tokens: int) -> tuple[dict, dict]:
    """eval.json's "generation" (the model's completions next to the references) and the older "continuation"."""
    gen: dict = {"copy_n": copy_n}
    continuation: dict = {"prompts": len(examples)}
    if not examples:
        return gen, continuation
    tokenizer, train = run.tokenizer, run.train
    references = [ex["reference"] for ex in examples]
    ngrams = NgramIndex(train, copy_n) if len(train) >= copy_n else None
    p_ids = [tokenizer.encode(p).ids for p in preds["model"]]
    r_ids = [tokenizer.encode(ref).ids for ref in references]
    gen["greedy"] = generation_metrics(p_ids, preds["model"], ngrams)
    gen["reference"] = generation_metrics(r_ids, references, ngrams)
    bleu = corpus_bleu_code(preds["model"], references)
    rl = task_out["systems"]["model"]["all"]["rougeL"]
    continuation.update({"prompt_tokens": round(task_out["prompt_tokens_mean"]),
                         "continuation_tokens": function_tokens, "bleu": bleu.score,
                         "bleu_precisions": bleu.precisions, "bleu_bp": bleu.bp, "bleu_signature": bleu.signature,
                         "rouge": {"rougeL": {"f": rl["value"], "f_low": rl["low"], "f_high": rl["high"]}}})
    return gen, continuation


def run_info(run: EvalRun) -> dict:
    return {"out_dir": str(run.out_dir), "checkpoint": run.checkpoint, "step": run.ckpt.get("step"),
            "params": run.model.num_params(), "model": run.ckpt["config"].get("model"),
            "data_dir": str(run.data_dir), "device": run.device}


def examples_jsonl(examples: list[dict], rows: dict, preds: dict) -> str:
    """eval_examples.jsonl: one line per example, its fields and every system's prediction and scores."""
    lines = []
    for i, ex in enumerate(examples):
        row = {k: ex[k] for k in ("id", "kind", "doc", "line", "prompt", "reference") if k in ex}
        for name in SYSTEMS:
            scores = {k: v for k, v in rows[name][i].items() if not k.endswith("_stats")}
            row[name] = {"prediction": preds[name][i], **scores}
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + ("\n" if lines else "")


def write_outputs(run: EvalRun, results: dict, examples: list[dict], rows: dict, preds: dict) -> None:
    """eval_examples.jsonl, eval.json, eval_dashboard.png and eval.md in the run dir."""
    out_dir = run.out_dir
    atomic_write(examples_jsonl(examples, rows, preds), out_dir / "eval_examples.jsonl")
    atomic_write(json.dumps(results, indent=2), out_dir / "eval.json")
    edit_sims = {n: [x["edit_sim"] for x in rows[n]] for n in ("model", "kn_full", "bigram") if n in rows}
    plot_dashboard(results, out_dir / "eval_dashboard.png", edit_sims)
    atomic_write(report_markdown(results, examples, rows, preds), out_dir / "eval.md")
    run.say(f"wrote {out_dir / 'eval.json'}, eval_examples.jsonl, eval.md, eval_dashboard.png")


def evaluate(out_dir: str | Path, *, data_dir: str | Path | None = None, device: str = "auto",
             max_tokens: int | None = None, window: int | None = None, stride: int | None = None,
             batch_size: int = 8, num_prompts: int = 360, function_prompts: int = 160, function_tokens: int = 128,
             line_tokens: int = 48, kn_order: int = 5, copy_n: int = 16, max_train_tokens: int | None = None,
             speed_tokens: int = 64, seed: int = 0, bootstrap_samples: int = 1000, best: bool = False,
             progress: bool = True, write: bool = True) -> dict:
    """Evaluate the run in out_dir (its ckpt.pt, or ckpt_best.pt with best=True); returns the eval.json dict.

    max_tokens caps the validation tokens scored (None = the whole split, as training's final val loss),
    num_prompts the task (function_prompts of them functions), max_train_tokens the training tokens the
    baselines count (None = all; decontamination always reads the whole training split). write=False
    skips the files.
    """
    out_dir = Path(out_dir)
    check_arguments(out_dir, num_prompts, function_prompts, function_tokens, line_tokens, kn_order)
    run = set_up(out_dir, data_dir, device, best, window, stride, max_train_tokens, progress)

    # 1. Perplexity: every token of the split after the first, scored once, by every system.
    val, n_bytes = scored_val(run, max_tokens)
    ppl, by_pos = model_perplexity(run, val, n_bytes, batch_size, progress)
    baselines, kn_full, kn_seen = counting_baselines(run, val, n_bytes, kn_order)
    say_bits_per_byte(run, ppl, baselines)

    # 2. The completion task, from validation files, decontaminated against every training file.
    caps = {"function": function_tokens, "line": line_tokens}
    task_out, examples, rows, preds = run_task(run, caps, num_prompts, function_prompts, kn_full, kn_seen,
                                               bootstrap_samples, seed)

    # 3. Generation metrics of the model's completions next to the references, and the old continuation keys.
    gen, continuation = completion_text_metrics(run, examples, preds, task_out, copy_n, function_tokens)

    # 4. Speed.
    speed = generation_speed(run.model, run.eot, speed_tokens, run.device)
    run.say(f"speed: {speed['tokens_per_s']:.1f} tokens/s, {speed['ms_per_token']:.2f} ms/token (batch 1, KV cache)")

    results = {
        "run": run_info(run), "perplexity": ppl, "training_log": last_training_eval(out_dir), "baselines": baselines,
        "loss_by_position": by_pos, "task": task_out, "continuation": continuation, "generation": gen,
        "speed": speed,
        "examples": [{"prompt": ex["prompt"], "reference": ex["reference"], "greedy": preds["model"][i]}
                     for i, ex in enumerate(examples[:4])],
        "timings_s": run.timings,
        "seconds": time.perf_counter() - run.started,
    }
    if write:
        write_outputs(run, results, examples, rows, preds)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Report and dashboard.

TASK_METRICS = (("exact", "exact match", 100), ("edit_sim", "edit similarity", 100), ("bleu", "BLEU", 1),
                ("chrf", "chrF", 1), ("rougeL", "ROUGE-L F", 100), ("ast_valid", "parses (ast)", 100))


def _bpb_rows(r: dict) -> list[tuple[str, str, dict]]:
    """(report name, dashboard label, result) for every system scored on the validation tokens."""
    p, b = r["perplexity"], r["baselines"]
    kn = b["kn_full"]["order"]
    rows = [("unigram, add-k", "unigram add-k", b["unigram"]), ("bigram, add-k", "bigram add-k", b["bigram"]),
            (f"Kneser-Ney {kn}-gram, {b['kn_seen']['train_tokens']:,} tokens seen",
             f"KN-{kn}, {b['kn_seen']['train_tokens'] / 1e6:.2g}M\ntokens seen", b["kn_seen"]),
            (f"Kneser-Ney {kn}-gram, whole train split ({b['kn_full']['train_tokens']:,})",
             f"KN-{kn}, whole train\n({b['kn_full']['train_tokens'] / 1e6:.3g}M tokens)", b["kn_full"]),
            (f"model, non-overlapping windows of {p['window']}", "model, non-\noverlapping", p["non_overlapping"])]
    if p["stride"] < p["window"]:
        rows.append((f"model, sliding window {p['window']}, stride {p['stride']}",
                     f"model, sliding\nstride {p['stride']}", p["sliding"]))
    return rows


def plot_dashboard(r: dict, path: Path, edit_sims: dict[str, list[float]] | None = None) -> None:
    """Six panels: bits per byte, loss by position, task metrics per system, per kind, edit similarity, generation."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    fig = Figure(figsize=(16, 9))
    ax = fig.subplots(2, 3)
    rows = _bpb_rows(r)
    vals = [x["bits_per_byte"] or 0 for _, _, x in rows]
    names = [label for _, label, _ in rows]
    colors = ["#bbb", "#999", "#d9a066", "#b5651d", "#6a9fd4", "#1f5fa8"][: len(rows)]
    ax[0, 0].barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax[0, 0].text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax[0, 0].invert_yaxis()
    ax[0, 0].tick_params(axis="y", labelsize=7)
    ax[0, 0].set_title("bits per byte on the validation split (lower is better)")
    if r["loss_by_position"]:
        ax[0, 1].plot(range(1, len(r["loss_by_position"]) + 1), r["loss_by_position"], label="model")
        ax[0, 1].axhline(r["baselines"]["kn_full"]["nll"], color="#b5651d", ls="--", label="Kneser-Ney (whole)")
        ax[0, 1].axhline(r["baselines"]["bigram"]["nll"], color="#999", ls="--", label="bigram")
        ax[0, 1].legend(fontsize=8)
    ax[0, 1].set(title="loss by position in the context window", xlabel="tokens of context", ylabel="NLL (nats)")
    t = r["task"]
    if t["systems"]:
        shown = ["model", "kn_full", "kn_seen", "bigram"]
        width = 0.8 / len(shown)
        for j, name in enumerate(shown):
            agg = t["systems"][name]["all"]
            ms = [(k, s) for k, _, s in TASK_METRICS if agg.get(k)]
            v = [agg[k]["value"] * s for k, s in ms]
            err = [[agg[k]["value"] * s - agg[k]["low"] * s for k, s in ms],
                   [agg[k]["high"] * s - agg[k]["value"] * s for k, s in ms]]
            ax[0, 2].bar(np.arange(len(ms)) + (j - 1.5) * width, v, width, yerr=err, capsize=2,
                         label=SYSTEM_NAMES[name])
        ax[0, 2].set_xticks(range(len(ms)), [dict((k, n) for k, n, _ in TASK_METRICS)[k] for k, _ in ms],
                            fontsize=7, rotation=20)
        ax[0, 2].legend(fontsize=7)
        ax[0, 2].set_ylabel("score (0-100)")
        for j, kind in enumerate(["function", "line"]):
            agg = t["systems"]["model"].get(kind)
            if not agg:
                continue
            ms = [(k, s) for k, _, s in TASK_METRICS if agg.get(k)]
            v = [agg[k]["value"] * s for k, s in ms]
            err = [[agg[k]["value"] * s - agg[k]["low"] * s for k, s in ms],
                   [agg[k]["high"] * s - agg[k]["value"] * s for k, s in ms]]
            ax[1, 0].bar(np.arange(len(ms)) + (j - 0.5) * 0.4, v, 0.4, yerr=err, capsize=3,
                         label=f"{kind} ({agg['n']})")
            ax[1, 0].set_xticks(range(len(ms)), [dict((k, n) for k, n, _ in TASK_METRICS)[k] for k, _ in ms],
                                fontsize=7, rotation=20)
        ax[1, 0].legend(fontsize=8)
    ax[0, 2].set_title(f"completion task, all {t['prompts']} prompts (95% CI, resampling files)")
    ax[1, 0].set_title("model by task kind (95% CI, resampling files)")
    hist = edit_sims or {}
    for name, values in hist.items():
        ax[1, 1].hist(values, bins=20, range=(0, 1), histtype="step", label=SYSTEM_NAMES[name])
    if hist:
        ax[1, 1].legend(fontsize=8)
    ax[1, 1].set(title="edit similarity per example", xlabel="edit similarity", ylabel="examples")
    g = r["generation"]
    kinds = [k for k in ("greedy", "reference") if k in g]
    metrics = ["distinct_1", "distinct_2", "repetition_4", "copy_rate"]
    for i, kind in enumerate(kinds):
        ax[1, 2].bar(np.arange(len(metrics)) + (i - 0.5) * 0.4, [g[kind].get(m) or 0 for m in metrics], 0.4,
                     label="model" if kind == "greedy" else kind)
    ax[1, 2].set_xticks(range(len(metrics)), [m if m != "copy_rate" else f"copy ({g['copy_n']}-gram)"
                                              for m in metrics], fontsize=8)
    ax[1, 2].set_title("model completions vs references")
    if kinds:
        ax[1, 2].legend(fontsize=8)
    run = r["run"]
    fig.suptitle(f"{run['out_dir']} - step {run['step']}, {run['params'] / 1e6:.2f}M params")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write(buf.getvalue(), path)


def _fence(text: str) -> str:
    return "~~~python\n" + text.replace("~~~", "~ ~ ~") + "\n~~~"


def _ci(v: dict | None, scale: float) -> str:
    if not v:
        return "-"
    return f"{scale * v['value']:.1f} [{scale * v['low']:.1f}, {scale * v['high']:.1f}]"


def _difference_lines(t: dict) -> list[str]:
    """The model minus each baseline, paired on the same prompts and resampled by file."""
    diffs = t.get("model_minus")
    if not diffs:
        return []
    lines = ["", "Model minus baseline, on the same prompts [95% paired cluster-bootstrap interval; an interval "
             "that excludes 0 is a difference these files support]:", "",
             "| baseline | " + " | ".join(n for _, n, _ in TASK_METRICS) + " |", "|---|" + "---:|" * len(TASK_METRICS)]
    for name, d in diffs.items():
        cells = []
        for k, _, sc in TASK_METRICS:
            v = d["all"].get(k)
            cells.append("-" if not v else f"{sc * v['value']:+.1f} [{sc * v['low']:+.1f}, {sc * v['high']:+.1f}]")
        lines.append(f"| {SYSTEM_NAMES[name]} | " + " | ".join(cells) + " |")
    return lines


def _f3(x: float | None) -> str:
    return f"{x:.3f}" if x is not None else "-"


def _bits_per_byte_lines(r: dict) -> list[str]:
    """The title, the bits-per-byte table and what its rows mean."""
    p, b, run = r["perplexity"], r["baselines"], r["run"]
    lines = [
        f"# Evaluation of `{run['out_dir']}`", "",
        f"Checkpoint `{run['checkpoint']}` at step {run['step']}, {run['params']:,} parameters, "
        f"data `{run['data_dir']}`, device {run['device']}. Took {r['seconds']:.1f} s.", "",
        "![dashboard](eval_dashboard.png)", "",
        f"## Bits per byte ({p['tokens']:,} validation tokens, {p['bytes'] or 0:,} bytes"
        f"{', the whole split' if p['whole_split'] else ', the first documents of the split'})", "",
        "| model | bits per byte | perplexity | NLL (nats/token) |", "|---|---:|---:|---:|",
    ]
    for name, _, x in _bpb_rows(r):
        lines.append(f"| {name} | **{_f3(x['bits_per_byte'])}** | {x['perplexity']:.2f} | {x['nll']:.4f} |")
    lines += [
        "",
        "Every row scores the same tokens (each after the first, once, end-of-text tokens included); bits per "
        "byte divides by the text's UTF-8 bytes plus one per end-of-text token (the document separator). "
        "The non-overlapping row is the definition "
        "training uses for its final val loss over the whole split; the sliding row gives every token at least "
        f"{p['window'] - p['stride']} tokens of context, so it is lower, and is the better estimate of the model. "
        f"Add-k smoothing: k = {b['unigram']['k']:g} (unigram), {b['bigram']['k']:g} (bigram), chosen on held-out "
        f"training text. Kneser-Ney \"tokens seen\" counts the first {b['kn_seen']['train_tokens']:,} training "
        f"tokens (the run consumed {b['seen_tokens']:,}: steps x batch x accumulation x block)"
        + (", which covers the whole split" if b["kn_seen"]["same_as_full"] else "") + ".",
    ]
    return lines + _training_log_lines(p, r.get("training_log") or {})


def _training_log_lines(p: dict, log: dict) -> list[str]:
    """How the loss here compares with what training logged in metrics.jsonl."""
    lines = []
    if "final_val_loss" in log:
        diff = p["non_overlapping"]["nll"] - log["final_val_loss"]
        lines += ["", f"Training's final val loss (metrics.jsonl, step {log.get('step')}): "
                  f"{log['final_val_loss']:.4f}; the non-overlapping NLL here: {p['non_overlapping']['nll']:.4f} "
                  f"(difference {diff:+.2e}"
                  + ("" if p["whole_split"] else "; this run scored only part of the split") + ")."]
    if "val_loss" in log:
        lines += ["", f"The last `val_loss` logged during training, {log['val_loss']:.4f}, is a mean over "
                  "random windows: a noisier estimate of the same quantity."]
    return lines + [""]


def _task_lines(t: dict) -> list[str]:
    """The completion task: how it was built, every system's scores, the differences and the scores by kind."""
    if not t["systems"]:
        return ["## Completion task", "", f"Skipped: {t.get('skipped')}", ""]
    c = t["counts"]
    lines = [
        f"## Completion task ({t['prompts']} prompts from {t['val_documents']} validation files)", "",
        f"{c['function']['chosen']} functions (signature + docstring -> body, up to {t['caps']['function']} "
        f"tokens, stop when a line returns to column 0) and {c['line']['chosen']} lines (8 lines of context -> "
        f"the next line, up to {t['caps']['line']} tokens, stop at the end of the line). Greedy decoding for "
        f"every system; prompts cut to their last {t['prompt_token_cap']} tokens. Decontamination against "
        f"{t['train_documents']} training files: of {c['function']['candidates']} function and "
        f"{c['line']['candidates']} line candidates, {c['function']['prompt_in_train']} and "
        f"{c['line']['prompt_in_train']} had a prompt that occurs in a training file, "
        f"{c['function']['body_in_train']} functions a body that does; {c['function']['too_long']} + "
        f"{c['line']['too_long']} had references longer than the token cap.", "",
        f"Value [95% interval]; all on a 0-100 scale. The interval is a cluster bootstrap over the "
        f"{t.get('documents', '?')} validation files the prompts come from: a resample draws files with "
        "replacement and keeps all of a file's prompts, because prompts from one file succeed or fail together "
        "(resampling prompts one by one would give too narrow an interval). BLEU and chrF are corpus scores "
        "(from summed statistics, as sacrebleu); BLEU is over code tokens (identifiers, numbers, single "
        "punctuation marks) because 13a splits identifiers at `_` and `char` rewards fragments. "
        "\"parses\" counts only examples whose reference parses with its prompt.", "",
        "| system | " + " | ".join(n for _, n, _ in TASK_METRICS) + " |",
        "|---|" + "---:|" * len(TASK_METRICS),
    ]
    for name in SYSTEMS:
        agg = t["systems"][name]["all"]
        lines.append(f"| {SYSTEM_NAMES[name]} | " + " | ".join(_ci(agg.get(k), sc) for k, _, sc in TASK_METRICS)
                     + " |")
    lines += _difference_lines(t)
    return lines + _by_kind_lines(t)


def _by_kind_lines(t: dict) -> list[str]:
    """The model's and Kneser-Ney's scores on functions and on lines apart."""
    lines = ["", "By kind:", "", "| system | kind | n | " + " | ".join(n for _, n, _ in TASK_METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(TASK_METRICS)]
    for name in ("model", "kn_full"):
        for kind in ("function", "line"):
            agg = t["systems"][name].get(kind)
            if agg:
                lines.append(f"| {SYSTEM_NAMES[name]} | {kind} | {agg['n']} | "
                             + " | ".join(_ci(agg.get(k), sc) for k, _, sc in TASK_METRICS) + " |")
    return lines + [""]


def _generation_lines(g: dict) -> list[str]:
    if "greedy" not in g:
        return []
    lines = ["## Generated text", "", "| text | distinct-1 | distinct-2 | repetition-4 | self-BLEU | "
             f"copies {g['copy_n']}+ training tokens |", "|---|---:|---:|---:|---:|---:|"]
    for kind in ("greedy", "reference"):
        m = g[kind]
        cr = f"{100 * m['copy_rate']:.0f}%" if "copy_rate" in m else "-"
        lines.append(f"| {'model' if kind == 'greedy' else kind} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "
                     f"{m['repetition_4']:.3f} | {_f3(m['self_bleu'])} | {cr} |")
    return lines + [""]


def _speed_lines(s: dict) -> list[str]:
    return ["## Speed (batch 1, greedy, KV cache)", "",
            f"{s['tokens_per_s']:.1f} tokens/s; {s['ms_per_token']:.2f} ms per token after the first; "
            f"time to first token {s['time_to_first_token_ms']:.1f} ms ({s['tokens']} tokens).", ""]


def _example_lines(examples: list[dict], rows: dict, preds: dict) -> list[str]:
    """The model's two best and two worst completions by edit similarity, next to Kneser-Ney's."""
    order = sorted(range(len(examples)), key=lambda i: (rows["model"][i]["edit_sim"], i))
    picks = [("Best", i) for i in order[::-1][:2]] + [("Worst", i) for i in order[:2]]
    lines = ["## Best and worst model completions (by edit similarity; all in eval_examples.jsonl)", ""]
    for label, i in picks:
        ex = examples[i]
        lines += [f"### {label}: example {ex['id']} ({ex['kind']}), edit similarity "
                  f"{rows['model'][i]['edit_sim']:.2f}", "", "Prompt:", "", _fence(ex["prompt"]), "",
                  "Reference:", "", _fence(ex["reference"]), "", "Model:", "", _fence(preds["model"][i]), "",
                  "Kneser-Ney (whole train split):", "", _fence(preds["kn_full"][i]), ""]
    return lines


def report_markdown(r: dict, examples: list[dict] | None = None, rows: dict | None = None,
                    preds: dict | None = None) -> str:
    """eval.md from the eval.json dict; the best and worst completions too when examples, rows and preds are given."""
    lines = _bits_per_byte_lines(r) + _task_lines(r["task"]) + _generation_lines(r["generation"])
    lines += _speed_lines(r["speed"])
    if examples and rows and preds:
        lines += _example_lines(examples, rows, preds)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate a minilm run; writes eval.json, eval_examples.jsonl, "
                                 "eval.md, eval_dashboard.png")
    ap.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt")
    ap.add_argument("--data_dir", default=None, help="override the data dir stored in the checkpoint")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--best", action="store_true", help="evaluate ckpt_best.pt instead of ckpt.pt")
    ap.add_argument("--max_tokens", type=int, default=0, help="validation tokens to score (0 = the whole split, "
                    "the same tokens as training's final val loss)")
    ap.add_argument("--window", type=int, default=None, help="context per window (default: block_size)")
    ap.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: window // 2)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_prompts", type=int, default=360, help="completion-task prompts (300+ for the report)")
    ap.add_argument("--function_prompts", type=int, default=160, help="of which function bodies (the rest lines)")
    ap.add_argument("--function_tokens", type=int, default=128, help="token cap for a function body")
    ap.add_argument("--line_tokens", type=int, default=48, help="token cap for a next line")
    ap.add_argument("--kn_order", type=int, default=5, help="Kneser-Ney order (3 to 5 is usual)")
    ap.add_argument("--copy_n", type=int, default=16, help="n-gram length that counts as copying training data")
    ap.add_argument("--max_train_tokens", type=int, default=0, help="training tokens the baselines count "
                    "(0 = all)")
    ap.add_argument("--speed_tokens", type=int, default=64)
    ap.add_argument("--bootstrap_samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default); 1 is "
                    "often fastest for tiny models on a busy machine")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        evaluate(a.out_dir, data_dir=a.data_dir, device=a.device, max_tokens=a.max_tokens or None,
                 window=a.window, stride=a.stride, batch_size=a.batch_size, num_prompts=a.num_prompts,
                 function_prompts=a.function_prompts, function_tokens=a.function_tokens, line_tokens=a.line_tokens,
                 kn_order=a.kn_order, copy_n=a.copy_n, max_train_tokens=a.max_train_tokens or None,
                 speed_tokens=a.speed_tokens, bootstrap_samples=a.bootstrap_samples, seed=a.seed, best=a.best,
                 progress=not a.quiet)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@dataclass
class EvalRun:
    """What every stage of evaluate() reads: the run, its model and data, and where timings go."""

    out_dir: Path
    checkpoint: str  # ckpt.pt or ckpt_best.pt
    device: str
    model: torch.nn.Module
    ckpt: dict
    data_dir: Path
    tokenizer: object
    eot: int
    window: int
    stride: int
    val_all: np.ndarray
    train_all: np.ndarray  # the whole split: decontamination reads every training file
    train: np.ndarray  # what the baselines count (the first max_train_tokens)
    say: Callable[..., None]
    started: float  # perf_counter() before the checkpoint loads, for "seconds"
    timings: dict = field(default_factory=dict)


if __name__ == "__main__":
    sys.exit(main())
