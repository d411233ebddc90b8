"""report.md and plots/ for a data dir: what every stage did, with numbers and pictures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dataset_curation.files import atomic_write


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    atomic_write(path, buf.getvalue())


def write_plots(out: Path, stats: dict, lengths_in: list[int], lengths_out: list[int],
                doc_tokens: np.ndarray) -> list[str]:
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    made = []

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    bins = np.logspace(0, np.log10(max(max(lengths_in, default=10), 10)) + 0.1, 50)
    ax.hist([max(x, 1) for x in lengths_in], bins=bins, alpha=0.6, label=f"read ({len(lengths_in):,})")
    ax.hist([max(x, 1) for x in lengths_out], bins=bins, alpha=0.6, label=f"kept ({len(lengths_out):,})")
    ax.set(xscale="log", xlabel="document length (characters)", ylabel="documents", title="Document lengths")
    ax.legend()
    fig.tight_layout()
    _save(fig, plots / "lengths.png")
    made.append("lengths.png")

    reasons = [(f"{s['name']}: {r}", n) for s in stats["stages"] for r, n in s["removed"].items()]
    reasons.sort(key=lambda x: x[1])
    fig = Figure(figsize=(7, max(2.5, 0.28 * len(reasons) + 1)))
    ax = fig.subplots()
    if reasons:
        ax.barh([r for r, _ in reasons], [n for _, n in reasons], color="tab:red")
    ax.set(xlabel="documents removed", title="Removals by stage and reason")
    fig.tight_layout()
    _save(fig, plots / "removals.png")
    made.append("removals.png")

    sizes = stats["near_duplicate_clusters"]["sizes"]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    if sizes:
        ax.hist(sizes, bins=np.arange(2, max(sizes) + 2) - 0.5, color="tab:purple")
    ax.set(xlabel="documents in cluster", ylabel="clusters", title=f"Near-duplicate clusters ({len(sizes)})")
    fig.tight_layout()
    _save(fig, plots / "clusters.png")
    made.append("clusters.png")

    src = stats["per_source"]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    names = sorted(src, key=lambda k: src[k]["tokens"])
    ax.barh(names, [src[k]["tokens"] for k in names], color="tab:green")
    ax.set(xlabel="tokens (train + val)", title="Tokens per source")
    fig.tight_layout()
    _save(fig, plots / "tokens_per_source.png")
    made.append("tokens_per_source.png")

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    if len(doc_tokens):
        ax.hist(doc_tokens, bins=np.logspace(0, np.log10(max(doc_tokens.max(), 10)) + 0.1, 50), color="tab:blue")
    ax.set(xscale="log", xlabel="tokens per document", ylabel="documents", title="Token-length distribution")
    fig.tight_layout()
    _save(fig, plots / "token_lengths.png")
    made.append("token_lengths.png")
    return made


def licence_table(rows: list[dict]) -> list[str]:
    """Markdown lines: distributions kept and removed by licence verdict, then one row per distribution."""
    kept = [r for r in rows if r["kept"]]
    lines = ["", "## Licences", "",
             f"{len(kept)} of {len(rows)} distributions kept (permissive licence; vendored copies below); removed: "
             + (", ".join(f"`{r['name']}` ({r['licence'] or 'no licence declared'}: {r['verdict']})"
                          for r in rows if not r["kept"]) or "none") + ".", "",
             "| licence | distributions or vendored copies | .py files | MB |", "|---|---:|---:|---:|"]
    by: dict[str, list] = {}
    for r in rows:  # a distribution's own files under its licence, each vendored copy under its own
        vend = r.get("vendored", [])
        own = {"files": r["files"] - sum(v["files"] for v in vend), "bytes": r["bytes"] - sum(v["bytes"] for v in vend)}
        by.setdefault(f"{r['licence'] or '(none)'}{'' if r['kept'] else ' (removed)'}", []).append(own)
        for v in vend:
            by.setdefault(f"{v['licence'] or '(none)'} (vendored{'' if v['kept'] else ', removed'})", []).append(v)
    for lic, rs in sorted(by.items(), key=lambda x: -sum(r["bytes"] for r in x[1])):
        n_files, mb = sum(r["files"] for r in rs), sum(r["bytes"] for r in rs) / 1e6
        lines.append(f"| {lic} | {len(rs)} | {n_files:,} | {mb:.1f} |")
    vendored = [(r["name"], v) for r in rows for v in r.get("vendored", [])]
    if vendored:
        out = [(n, v) for n, v in vendored if not v["kept"]]
        lines += ["", f"Vendored copies: {len(vendored)}, each decided by its own metadata; {len(out)} left out.", "",
                  "| in | vendored | name | version | licence | kept | .py files | evidence |",
                  "|---|---|---|---|---|---|---:|---|"]
        for n, v in vendored:
            lines.append(f"| {n} | `{v['path']}` | {v['name']} | {v['version'] or '-'} | {v['licence'] or '-'} | "
                         f"{'yes' if v['kept'] else 'no (' + v['verdict'] + ')'} | {v['files']:,} | {v['evidence']} |")
    lines += ["", "| distribution | version | licence | kept | .py files | MB | documents after curation | tokens |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        lines.append(f"| {r['name']} | {r['version']} | {r['licence'] or '-'} | {'yes' if r['kept'] else 'no'} | "
                     f"{r['files']:,} | {r['bytes'] / 1e6:.2f} | {r.get('documents_after_curation', 0):,} | "
                     f"{r.get('tokens_after_curation', 0):,} |")
    return lines


def render_markdown(stats: dict, meta_like: dict | None = None) -> str:
    lines = ["# Data report", ""]
    lines += ["## Stages", "", "Documents in = kept + removed at every stage (characters counted on the way in).", "",
              "| stage | docs in | kept | removed | chars in | chars kept | removed by reason | notes |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for s in stats["stages"]:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(s["removed"].items(), key=lambda x: -x[1])) or "-"
        notes = ", ".join(f"{k} {v:,}" for k, v in s["counters"].items()) or "-"
        lines.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_kept']:,} | {s['docs_removed']:,} | "
                     f"{s['chars_in']:,} | {s['chars_kept']:,} | {reasons} | {notes} |")
    cl = stats["near_duplicate_clusters"]
    lines += ["", "## Near duplicates", "",
              f"{cl['count']} clusters; sizes {cl['sizes'][:20]}{' ...' if len(cl['sizes']) > 20 else ''}.", ""]
    for c in cl["examples"][:5]:
        more = " ..." if len(c) > 6 else ""
        lines.append(f"- kept `{c[0]}`, dropped " + ", ".join(f"`{x}`" for x in c[1:6]) + more)
    lines += ["", "## Tokens", "", "| split | documents | tokens | bytes | bytes/token |", "|---|---:|---:|---:|---:|"]
    for sp in ("train", "val"):
        t, b = stats["tokens"][sp], stats["bytes"][sp]
        lines.append(f"| {sp} | {stats['documents'][sp]:,} | {t:,} | {b:,} | {b / max(t, 1):.2f} |")
    lines += ["", "| source | documents | tokens | bytes/token |", "|---|---:|---:|---:|"]
    for name, s in sorted(stats["per_source"].items()):
        lines.append(f"| {name} | {s['documents']:,} | {s['tokens']:,} | {s['bytes'] / max(s['tokens'], 1):.2f} |")
    if stats.get("distributions"):
        lines += licence_table(stats["distributions"])
    if stats.get("note"):
        lines += ["", f"**Note:** {stats['note']}"]
    lines += ["", "## Plots", ""]
    for name, title in [("lengths", "Document lengths before and after"), ("removals", "Removals by reason"),
                        ("clusters", "Near-duplicate cluster sizes"), ("tokens_per_source", "Tokens per source"),
                        ("token_lengths", "Tokens per document")]:
        lines.append(f"![{title}](plots/{name}.png)")
    lines += ["", "Removed documents, a few per reason: `removed_samples.json`. Per-stage counts: `stats.json`.", ""]
    return "\n".join(lines)


def write_report(out: Path, stats: dict, lengths_in: list[int], lengths_out: list[int],
                 doc_tokens: np.ndarray) -> None:
    write_plots(out, stats, lengths_in, lengths_out, doc_tokens)
    atomic_write(out / "report.md", render_markdown(stats))
