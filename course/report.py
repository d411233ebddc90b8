"""The training report of day 14, as markdown with figures, from a run dir's own files.

    python -m course report --out_dir out/tiny        # writes out/tiny/report.md and out/tiny/report_curves.png

It reads config.yaml, metrics.jsonl, the checkpoint's step and, when `python -m minilm.evaluate` has run,
eval.json (perplexity against the unigram and bigram baselines, the code-completion task's scores, speed and
sample completions); loadtest.json and ablation.json (your ablation's rows from notebook 05) when present.
What is missing is named in the report with the command that makes it. The "Lessons learned" section is left
for you to write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class ReportError(ValueError):
    """The run dir cannot be reported on; the message says what is missing and how to make it."""


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by Ctrl-C is not worth failing the report over
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _eval_section(r: dict) -> list[str]:
    p, b = r["perplexity"], r["baselines"]
    rows = [["model (sliding window)", f"{p['sliding']['perplexity']:.2f}", f"{p['sliding']['nll']:.4f}",
             f"{p['sliding'].get('bits_per_byte', float('nan')):.3f}"]]
    for name in ("bigram", "unigram"):
        rows.append([f"{name} baseline", f"{b[name]['perplexity']:.2f}", f"{b[name]['nll']:.4f}",
                     f"{b[name].get('bits_per_byte', float('nan')):.3f}"])
    beats = p["sliding"]["nll"] < b["bigram"]["nll"]
    lines = ["## Metrics against the baselines", "",
             f"Validation tokens scored: {p.get('tokens', '?'):,}; window {p.get('window')}, stride {p.get('stride')}.",
             "", _table(["", "perplexity", "loss (nats/token)", "bits/byte"], rows), "",
             f"The model {'beats' if beats else 'does NOT beat'} the bigram baseline on the same tokens.", ""]
    lines += _task_lines(r)
    c = r.get("continuation", {})
    if "bleu" in c and not r.get("task", {}).get("systems"):  # an eval.json from before the completion task
        rl = c.get("rouge", {}).get("rougeL", {})
        lines += [f"Continuation task ({c.get('prompts', c.get('num_prompts', '?'))} held-out prompts): BLEU "
                  f"{c['bleu']:.2f} (brevity penalty {c.get('bleu_bp', float('nan')):.3f}), ROUGE-L F "
                  f"{rl.get('f', float('nan')):.3f}.", ""]
    s = r.get("speed", {})
    if s:
        lines += [f"Generation speed: {s.get('tokens_per_s', float('nan')):.1f} tokens/s "
                  f"({s.get('ms_per_token', float('nan')):.2f} ms/token, batch 1, KV cache).", ""]
    if (Path(r["run"]["out_dir"]) / "eval_dashboard.png").is_file():
        lines += ["![evaluation dashboard](eval_dashboard.png)", ""]
    return lines


def _task_lines(r: dict) -> list[str]:
    """The model's scores on the code-completion task, each with its 95% cluster-bootstrap interval."""
    t = r.get("task", {})
    m = t.get("systems", {}).get("model", {}).get("all")
    if not m:
        return []
    names = (("exact", "exact match"), ("edit_sim", "edit similarity"), ("bleu", "BLEU (code tokens)"),
             ("chrf", "chrF"), ("rougeL", "ROUGE-L F"), ("ast_valid", "parses"))
    parts = [f"{label} {m[k]['value']:.3f} [{m[k]['low']:.3f}, {m[k]['high']:.3f}]" for k, label in names if m.get(k)]
    return [f"Code-completion task ({t.get('prompts', '?')} prompts from {t.get('documents', '?')} validation files, "
            "greedy, cut by the stop rules): " + "; ".join(parts) + ".", ""]


def _samples_section(r: dict | None) -> list[str]:
    lines = ["## Samples", ""]
    examples = (r or {}).get("examples") or []
    if not examples:
        return lines + ["No samples yet: `python -m minilm.evaluate` stores prompts with the model's completions.", ""]
    for i, ex in enumerate(examples[:3]):
        lines += [f"**Prompt {i + 1}**", "", "```", str(ex.get("prompt", "")).strip()[-300:], "```", "",
                  "Greedy completion (cut by the stop rule):", "", "```", str(ex.get("greedy", "")).strip()[:400],
                  "```", "",
                  "Reference:", "", "```", str(ex.get("reference", "")).strip()[:400], "```", ""]
    return lines


def _ablation_section(out: Path) -> list[str]:
    """Your ablation from notebook 05 (ablation.json, my_ablation's rows), when the run dir has one."""
    if not (out / "ablation.json").is_file():
        return []
    rows = json.loads((out / "ablation.json").read_text())
    table = _table(["variant", "parameters", "tokens/s", "val loss, equal tokens", "steps, equal time",
                    "val loss, equal time"],
                   [[r["variant"], f"{r['params']:,}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['equal_tokens']['val_loss']:.4f}", r["equal_time"]["steps"],
                     f"{r['equal_time']['val_loss']:.4f}"] for r in rows])
    return ["## Your ablation", "", "Each variant trained by your own stack, from the same seed; the val loss is "
            "over the whole val split.", "", table, ""]


def write_report(out_dir: str | Path) -> Path:
    """Write out_dir/report.md (and report_curves.png) from the run's files; returns the report's path."""
    from minilm.checkpoint import atomic_write
    from minilm.train import plot_curves

    out = Path(out_dir)
    missing = [f for f in ("config.yaml", "metrics.jsonl") if not (out / f).is_file()]
    if missing:
        raise ReportError(f"{out} lacks {', '.join(missing)}: is it a run dir? Train one with "
                          f"`python -m minilm.train --out_dir {out}`")
    rows = _rows(out / "metrics.jsonl")
    steps = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("val_loss") is not None]
    if not steps:
        raise ReportError(f"{out / 'metrics.jsonl'} has no logged training step yet: let the run log first")
    plot_curves(out / "metrics.jsonl", out / "report_curves.png")
    tok_s = sorted(r["tokens_per_s"] for r in steps if r.get("tokens_per_s"))
    lines = [f"# Training report: {out.name}", "",
             "## Run", "",
             f"- steps logged: {steps[-1]['step']:,}; last training loss {steps[-1]['loss']:.4f}"]
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        lines.append(f"- validation loss: last {evals[-1]['val_loss']:.4f}, best {best['val_loss']:.4f} at step "
                     f"{best['step']:,} (perplexity {math.exp(best['val_loss']):.2f})")
    if tok_s:
        lines.append(f"- throughput: median {tok_s[len(tok_s) // 2]:,.0f} tokens/s")
    lines += ["", "## Learning curves", "", "![learning curves](report_curves.png)", ""]
    r = None
    if (out / "eval.json").is_file():
        r = json.loads((out / "eval.json").read_text())
        lines += _eval_section(r)
    else:
        lines += ["## Metrics against the baselines", "",
                  f"Not evaluated yet: `python -m minilm.evaluate --out_dir {out}` writes eval.json.", ""]
    lines += _samples_section(r)
    if (out / "loadtest.json").is_file():
        for line in (out / "loadtest.json").read_text().splitlines():
            try:
                lt = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(lt, dict) and "errors" in lt:
                keys = [k for k in ("requests", "concurrency", "errors", "tokens_per_s", "latency_p50_s",
                                    "latency_p95_s") if k in lt]
                lines += ["## Serving under load", "", _table(keys, [[lt[k] for k in keys]]), ""]
    lines += _ablation_section(out)
    lines += ["## Config", "", "```yaml", (out / "config.yaml").read_text().strip(), "```", "",
              "## Lessons learned", "", "<!-- What worked, what did not, what you would change next time. -->", ""]
    path = out / "report.md"
    atomic_write("\n".join(lines), path)
    return path
