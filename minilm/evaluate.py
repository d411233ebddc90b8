"""Evaluate a trained run: perplexity, baselines, a continuation task, generation metrics and speed.

    python -m minilm.evaluate --out_dir out/tiny
    python -m minilm.evaluate --out_dir out/tiny --max_tokens 5000 --num_prompts 4     # quicker

Writes out_dir/eval.json (every number), out_dir/eval.md (a readable report) and out_dir/eval_dashboard.png.
From Python: `from minilm.evaluate import evaluate; results = evaluate("out/tiny")`.

What it measures, all on the validation split (text the model never trained on):
  - perplexity with sliding windows (stride = half the context) and with non-overlapping windows, plus
    bits per byte, which compares runs whose tokenizers differ;
  - unigram and bigram add-k baselines on the same tokens: what counting alone achieves;
  - continuation: the start of a held-out document is the prompt, what follows is the reference; the
    greedy continuation is scored with BLEU and ROUGE;
  - generation metrics for greedy and sampled continuations next to the same metrics of the references:
    distinct-n, repetition, self-BLEU and the share of continuations copying 16+ training tokens verbatim;
  - generation speed with the KV cache: time to first token, tokens per second, latency per token.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metrics.baselines import bigram_perplexity, fit_add_k, unigram_perplexity
from metrics.bleu import corpus_bleu
from metrics.generation import NgramIndex, distinct_n, repetition_rate, self_bleu
from metrics.perplexity import perplexity, token_nll
from metrics.rouge import bootstrap_aggregate, rouge_scores
from minilm.checkpoint import CheckpointError, atomic_write, model_from_checkpoint
from minilm.data import DataError, TokenData, load_tokenizer, read_meta
from minilm.sample import pick_device


def eval_stream(val: np.ndarray, eot: int, max_tokens: int | None) -> np.ndarray:
    """The validation tokens to score: whole documents up to max_tokens, after one end-of-text token.

    The leading end-of-text makes the first document's first token a scored "start of document" prediction,
    as every other document's is; cutting at a document end keeps the decoded byte count exact.
    """
    ids = np.asarray(val[:max_tokens] if max_tokens else val, dtype=np.int64)
    if max_tokens and len(val) > max_tokens:
        ends = np.flatnonzero(ids == eot)
        if len(ends) and ends[-1] > 0:
            ids = ids[: ends[-1] + 1]
    return np.concatenate([[eot], ids])


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


def split_documents(ids: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], ends + 1])
    return [ids[s:e] for s, e in zip(starts, np.concatenate([ends, [len(ids)]])) if e > s]


def pick_prompts(val: np.ndarray, eot: int, num: int, prompt_tokens: int, cont_tokens: int):
    """Up to num held-out documents, evenly spread, long enough for a prompt and a reference continuation."""
    docs = [d for d in split_documents(np.asarray(val, dtype=np.int64), eot) if len(d) >= prompt_tokens + cont_tokens]
    if not docs:
        return []
    picks = np.linspace(0, len(docs) - 1, min(num, len(docs))).round().astype(int)
    return [(docs[i][:prompt_tokens], docs[i][prompt_tokens : prompt_tokens + cont_tokens]) for i in picks]


def continuation_ids(model, prompts: list[np.ndarray], eot: int, new_tokens: int, device, temperature: float = 0.0,
                     seed: int = 0) -> tuple[list[list[int]], float]:
    """Continue each prompt (prefixed with end-of-text) in one batch; cut each at end-of-text. Returns (ids, s)."""
    idx = torch.tensor(np.stack([np.concatenate([[eot], p]) for p in prompts]), dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = model.generate(idx, new_tokens, temperature=temperature, top_k=50 if temperature > 0 else None,
                         eos_id=eot, seed=seed)
    dt = time.perf_counter() - t0
    conts = []
    for row in out[:, idx.size(1) :].tolist():
        conts.append(row[: row.index(eot)] if eot in row else row)
    return conts, dt


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
    for _ in model.generate_stream(idx, 4, temperature=0.0):
        pass
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in model.generate_stream(idx, new_tokens, temperature=0.0):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"tokens": n, "time_to_first_token_ms": 1000 * first, "tokens_per_s": n / total,
            "ms_per_token": 1000 * (total - first) / max(n - 1, 1)}


def evaluate(out_dir: str | Path, *, data_dir: str | Path | None = None, device: str = "auto",
             max_tokens: int | None = 50_000, window: int | None = None, stride: int | None = None,
             batch_size: int = 8, num_prompts: int = 16, prompt_tokens: int = 32, continuation_tokens: int = 32,
             copy_n: int = 16, max_train_tokens: int | None = 20_000_000, speed_tokens: int = 64, seed: int = 0,
             best: bool = False, progress: bool = True, write: bool = True) -> dict:
    """Evaluate the run in out_dir (its ckpt.pt, or ckpt_best.pt with best=True); returns the eval.json dict.

    max_tokens caps the validation tokens scored, num_prompts the continuation task, max_train_tokens the
    training tokens used for baselines and copy detection (None = all). write=False skips the files.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"run dir {out_dir} does not exist; train first: python -m minilm.train "
                              f"--out_dir {out_dir}")
    device = pick_device(device)
    t_start = time.perf_counter()
    model, ckpt = model_from_checkpoint(out_dir / ("ckpt_best.pt" if best else "ckpt.pt"), device)
    cfg = model.config
    data_dir = data_dir or ckpt["config"].get("train", {}).get("data_dir")
    if not data_dir:
        raise DataError(f"the checkpoint in {out_dir} does not record its data dir; pass --data_dir")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist (relative paths count from the current directory); "
                        "pass --data_dir (evaluate(..., data_dir=...)) pointing at the run's data dir")
    meta = read_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    if meta["vocab_size"] > cfg.vocab_size:
        raise DataError(f"{data_dir} has a {meta['vocab_size']}-token vocabulary but the model only "
                        f"{cfg.vocab_size}: this is not the data dir the run was trained on; pass --data_dir")
    eot = meta.get("eot_id")
    if eot is None:
        eot = tokenizer.token_to_id(meta.get("eot_token", "<|endoftext|>"))
    if eot is None:
        raise DataError(f"{data_dir}/meta.json has no eot_id and the tokenizer has no <|endoftext|> token")
    val = TokenData(data_dir, "val").tokens
    train = TokenData(data_dir, "train").tokens
    train = np.asarray(train[:max_train_tokens] if max_train_tokens else train, dtype=np.int64)
    window = window or cfg.block_size
    if window > cfg.block_size:
        raise ValueError(f"window={window} is longer than the model's context (block_size={cfg.block_size})")
    stride = stride or max(1, window // 2)
    say = print if progress else (lambda *a, **k: None)

    # 1. Perplexity on whole validation documents, and the same tokens under counting baselines.
    stream = eval_stream(val, eot, max_tokens)
    n_bytes = len(tokenizer.decode(stream.tolist()).encode("utf-8")) or None
    say(f"evaluating {out_dir} (step {ckpt.get('step')}) on {len(stream) - 1:,} validation tokens, "
        f"{n_bytes or 0:,} bytes, device {device}")
    fn = lambda ids: model(ids)[0]
    sliding = perplexity(fn, stream, window, stride, byte_count=n_bytes, batch_size=batch_size, device=device,
                         progress=progress)
    chunks = perplexity(fn, stream, window, window, byte_count=n_bytes, batch_size=batch_size, device=device,
                        progress=progress)
    k1, k2 = fit_add_k(train, cfg.vocab_size, 1), fit_add_k(train, cfg.vocab_size, 2)
    uni = unigram_perplexity(train, stream, cfg.vocab_size, k=k1, byte_count=n_bytes)
    bi = bigram_perplexity(train, stream, cfg.vocab_size, k=k2, byte_count=n_bytes)
    by_pos = loss_by_position(model, stream, window)
    say(f"perplexity {sliding.perplexity:.2f} (sliding, stride {stride}), {chunks.perplexity:.2f} (non-overlapping); "
        f"bigram {bi.perplexity:.2f}, unigram {uni.perplexity:.2f}")

    # 2. Continuation task on held-out documents, greedy and sampled, scored against the true text.
    pairs = pick_prompts(val, eot, num_prompts, prompt_tokens, continuation_tokens)
    task: dict = {"prompts": len(pairs), "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens}
    examples = []
    if pairs:
        index = NgramIndex(train, copy_n) if len(train) >= copy_n else None
        prompts, refs = [p for p, _ in pairs], [r.tolist() for _, r in pairs]
        greedy, dt = continuation_ids(model, prompts, eot, continuation_tokens, device)
        sampled, _ = continuation_ids(model, prompts, eot, continuation_tokens, device, temperature=0.8, seed=seed)
        ref_texts = [tokenizer.decode(r) for r in refs]
        greedy_texts = [tokenizer.decode(g) for g in greedy]
        sampled_texts = [tokenizer.decode(s) for s in sampled]
        bleu = corpus_bleu(greedy_texts, [ref_texts])
        rouge = rouge_scores(greedy_texts, ref_texts, ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        agg = bootstrap_aggregate(rouge, n_samples=1000, seed=seed)
        task.update({
            "bleu": bleu.score, "bleu_precisions": bleu.precisions, "bleu_bp": bleu.bp,
            "bleu_signature": bleu.signature,
            # the mean over prompts, with the bootstrap's 95% interval around it
            "rouge": {k: {"f": float(np.mean([s[k].fmeasure for s in rouge])), "f_low": v.low.fmeasure,
                          "f_high": v.high.fmeasure, "precision": float(np.mean([s[k].precision for s in rouge])),
                          "recall": float(np.mean([s[k].recall for s in rouge]))} for k, v in agg.items()},
            "batch_tokens_per_s": sum(map(len, greedy)) / dt if dt > 0 else None,
        })
        gen = {"greedy": generation_metrics(greedy, greedy_texts, index),
               "sampled_t0.8_top50": generation_metrics(sampled, sampled_texts, index),
               "reference": generation_metrics(refs, ref_texts, index)}
        examples = [{"prompt": tokenizer.decode(p.tolist()), "reference": r, "greedy": g, "sampled": s}
                    for p, r, g, s in zip(prompts, ref_texts, greedy_texts, sampled_texts)]
    else:
        task["skipped"] = (f"no validation document has {prompt_tokens + continuation_tokens} tokens; "
                           "lower --prompt_tokens/--continuation_tokens")
        gen = {}
    say(f"continuation: BLEU {task.get('bleu', float('nan')):.2f}, "
        f"ROUGE-L F {task.get('rouge', {}).get('rougeL', {}).get('f', float('nan')):.3f} on {len(pairs)} prompts")

    # 3. Speed.
    speed = generation_speed(model, eot, speed_tokens, device)
    say(f"speed: {speed['tokens_per_s']:.1f} tokens/s, {speed['ms_per_token']:.2f} ms/token (batch 1, KV cache)")

    results = {
        "run": {"out_dir": str(out_dir), "checkpoint": "ckpt_best.pt" if best else "ckpt.pt",
                "step": ckpt.get("step"), "params": model.num_params(), "model": ckpt["config"].get("model"),
                "data_dir": str(data_dir), "device": device},
        "perplexity": {"window": window, "stride": stride, "tokens": sliding.tokens, "bytes": n_bytes,
                       "sliding": sliding.as_dict(), "non_overlapping": chunks.as_dict()},
        "baselines": {"unigram": {**uni.as_dict(), "k": k1}, "bigram": {**bi.as_dict(), "k": k2},
                      "train_tokens": len(train)},
        "loss_by_position": by_pos,
        "continuation": task,
        "generation": {**gen, "copy_n": copy_n},
        "speed": speed,
        "examples": examples[:4],
        "seconds": time.perf_counter() - t_start,
    }
    if write:
        atomic_write(json.dumps(results, indent=2), out_dir / "eval.json")
        plot_dashboard(results, out_dir / "eval_dashboard.png")
        atomic_write(report_markdown(results), out_dir / "eval.md")
        say(f"wrote {out_dir / 'eval.json'}, {out_dir / 'eval.md'}, {out_dir / 'eval_dashboard.png'}")
    return results


def plot_dashboard(r: dict, path: Path) -> None:
    """Four panels: perplexities vs baselines, loss by context position, continuation scores, generation metrics."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    fig = Figure(figsize=(12, 8))
    ax = fig.subplots(2, 2)
    p, b = r["perplexity"], r["baselines"]
    names = ["unigram", "bigram", "model\n(non-overlap)", "model\n(sliding)"]
    vals = [b["unigram"]["perplexity"], b["bigram"]["perplexity"], p["non_overlapping"]["perplexity"],
            p["sliding"]["perplexity"]]
    ax[0, 0].bar(names, vals, color=["#bbb", "#999", "#6a9fd4", "#1f5fa8"])
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_title("validation perplexity (lower is better)")
    for i, v in enumerate(vals):
        ax[0, 0].text(i, v, f"{v:.1f}", ha="center", va="bottom")
    if r["loss_by_position"]:
        ax[0, 1].plot(range(1, len(r["loss_by_position"]) + 1), r["loss_by_position"], label="model")
        ax[0, 1].axhline(b["bigram"]["nll"], color="#999", ls="--", label="bigram baseline")
        ax[0, 1].legend()
    ax[0, 1].set(title="loss by position in the context window", xlabel="tokens of context", ylabel="NLL (nats)")
    c = r["continuation"]
    if "bleu" in c:
        keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        vals = [c["bleu"]] + [100 * c["rouge"][k]["f"] for k in keys]
        err = [[0] + [100 * (c["rouge"][k]["f"] - c["rouge"][k]["f_low"]) for k in keys],
               [0] + [100 * (c["rouge"][k]["f_high"] - c["rouge"][k]["f"]) for k in keys]]
        ax[1, 0].bar(["BLEU"] + [k.replace("rouge", "ROUGE-") for k in keys], vals, yerr=err, capsize=4,
                     color="#4c9a5f")
        ax[1, 0].set_ylim(0, max(10.0, 1.15 * max(vals)))
        ax[1, 0].set_ylabel("score (0-100)")
    ax[1, 0].set_title(f"greedy continuation vs reference ({c['prompts']} prompts, 95% CI)")
    g = r["generation"]
    kinds = [k for k in ("greedy", "sampled_t0.8_top50", "reference") if k in g]
    metrics = ["distinct_1", "distinct_2", "repetition_4", "copy_rate"]
    for i, kind in enumerate(kinds):
        ax[1, 1].bar(np.arange(len(metrics)) + (i - 1) * 0.27, [g[kind].get(m) or 0 for m in metrics], 0.27,
                     label=kind)
    ax[1, 1].set_xticks(range(len(metrics)), [m if m != "copy_rate" else f"copy ({g['copy_n']}-gram)"
                                              for m in metrics])
    ax[1, 1].set_title("generated text vs human reference")
    if kinds:
        ax[1, 1].legend(fontsize=8)
    run = r["run"]
    fig.suptitle(f"{run['out_dir']} - step {run['step']}, {run['params'] / 1e6:.2f}M params")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(buf.getvalue(), path)


def _fence(text: str) -> str:
    return "~~~text\n" + text.replace("~~~", "~ ~ ~") + "\n~~~"


def report_markdown(r: dict) -> str:
    p, b, c, g, s, run = r["perplexity"], r["baselines"], r["continuation"], r["generation"], r["speed"], r["run"]
    bpb = lambda x: f"{x['bits_per_byte']:.3f}" if x.get("bits_per_byte") else "-"
    lines = [
        f"# Evaluation of `{run['out_dir']}`", "",
        f"Checkpoint `{run['checkpoint']}` at step {run['step']}, {run['params']:,} parameters, "
        f"data `{run['data_dir']}`, device {run['device']}. Took {r['seconds']:.1f} s.", "",
        "![dashboard](eval_dashboard.png)", "",
        f"## Perplexity ({p['tokens']:,} validation tokens, {p['bytes'] or 0:,} bytes)", "",
        "| model | perplexity | NLL (nats/token) | bits per byte |", "|---|---:|---:|---:|",
        f"| unigram, add-{b['unigram']['k']:g} | {b['unigram']['perplexity']:.2f} | {b['unigram']['nll']:.4f} | "
        f"{bpb(b['unigram'])} |",
        f"| bigram, add-{b['bigram']['k']:g} | {b['bigram']['perplexity']:.2f} | {b['bigram']['nll']:.4f} | "
        f"{bpb(b['bigram'])} |",
        f"| model, non-overlapping windows of {p['window']} | {p['non_overlapping']['perplexity']:.2f} | "
        f"{p['non_overlapping']['nll']:.4f} | {bpb(p['non_overlapping'])} |",
        f"| model, sliding window {p['window']}, stride {p['stride']} | {p['sliding']['perplexity']:.2f} | "
        f"{p['sliding']['nll']:.4f} | {bpb(p['sliding'])} |", "",
        f"Baselines count {b['train_tokens']:,} training tokens; k was chosen on held-out training text.", "",
    ]
    if "bleu" in c:
        lines += [
            f"## Continuation task ({c['prompts']} held-out documents: {c['prompt_tokens']}-token prompt, "
            f"{c['continuation_tokens']}-token greedy continuation)", "",
            "| metric | score | 95% bootstrap CI |", "|---|---:|---:|",
            f"| BLEU (`{c['bleu_signature'].replace('|', ', ')}`) | {c['bleu']:.2f} | |",
        ]
        for k, v in c["rouge"].items():
            lines.append(f"| {k} F | {100 * v['f']:.2f} | {100 * v['f_low']:.2f} - {100 * v['f_high']:.2f} |")
        lines += ["", "| text | distinct-1 | distinct-2 | repetition-4 | self-BLEU | "
                  f"copies {g['copy_n']}+ training tokens |", "|---|---:|---:|---:|---:|---:|"]
        for kind in ("greedy", "sampled_t0.8_top50", "reference"):
            m = g[kind]
            sb = f"{m['self_bleu']:.2f}" if m["self_bleu"] is not None else "-"
            cr = f"{100 * m['copy_rate']:.0f}%" if "copy_rate" in m else "-"
            lines.append(f"| {kind} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | {m['repetition_4']:.3f} | "
                         f"{sb} | {cr} |")
        lines.append("")
    else:
        lines += ["## Continuation task", "", f"Skipped: {c['skipped']}", ""]
    lines += [
        "## Speed (batch 1, greedy, KV cache)", "",
        f"{s['tokens_per_s']:.1f} tokens/s; {s['ms_per_token']:.2f} ms per token after the first; "
        f"time to first token {s['time_to_first_token_ms']:.1f} ms ({s['tokens']} tokens)."
        + (f" Batched continuation: {c['batch_tokens_per_s']:.0f} tokens/s." if c.get("batch_tokens_per_s") else ""),
        "",
    ]
    for i, ex in enumerate(r["examples"][:3]):
        lines += [f"## Example {i + 1}", "", "Prompt:", "", _fence(ex["prompt"]), "", "Reference:", "",
                  _fence(ex["reference"]), "", "Greedy:", "", _fence(ex["greedy"]), "", "Sampled:", "",
                  _fence(ex["sampled"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate a minilm run; writes eval.json, eval.md, eval_dashboard.png")
    ap.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt")
    ap.add_argument("--data_dir", default=None, help="override the data dir stored in the checkpoint")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--best", action="store_true", help="evaluate ckpt_best.pt instead of ckpt.pt")
    ap.add_argument("--max_tokens", type=int, default=50_000, help="validation tokens to score (0 = all)")
    ap.add_argument("--window", type=int, default=None, help="context per window (default: block_size)")
    ap.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: window // 2)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_prompts", type=int, default=16)
    ap.add_argument("--prompt_tokens", type=int, default=32)
    ap.add_argument("--continuation_tokens", type=int, default=32)
    ap.add_argument("--copy_n", type=int, default=16, help="n-gram length that counts as copying training data")
    ap.add_argument("--max_train_tokens", type=int, default=20_000_000, help="training tokens for baselines and "
                    "copy detection (0 = all)")
    ap.add_argument("--speed_tokens", type=int, default=64)
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
                 prompt_tokens=a.prompt_tokens, continuation_tokens=a.continuation_tokens, copy_n=a.copy_n,
                 max_train_tokens=a.max_train_tokens or None, speed_tokens=a.speed_tokens, seed=a.seed,
                 best=a.best, progress=not a.quiet)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
