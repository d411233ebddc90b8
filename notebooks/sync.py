"""Write the committed notebooks from their sources: notebooks/week*/NN.py (jupytext percent format) -> NN.ipynb.

    python notebooks/sync.py            # after editing a .py, or the Repository URL in pyproject.toml
    python notebooks/sync.py --check    # exit 1 when an .ipynb or a badge is out of date (the tests do the same)

The .py is what people edit and review (a plain script with `# %%` cell markers; JupyterLab with jupytext opens
it as a notebook too). The .ipynb is what nbval, Colab and a plain Jupyter open, stored without outputs. Every
notebook's Colab badge and clone command come from one setting, `Repository` under [project.urls] in
pyproject.toml: change it there (e.g. for a fork) and rerun this script.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import jupytext
import nbformat

NB_DIR = Path(__file__).resolve().parent
ROOT = NB_DIR.parent


def repo_url() -> str:
    """The repository's https URL on GitHub, from pyproject.toml's [project.urls] Repository."""
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise SystemExit(f"pyproject.toml [project.urls] Repository = {url!r}: expected https://github.com/OWNER/NAME "
                         "(Colab opens notebooks from GitHub)")
    return url


def with_repo(text: str, url: str) -> str:
    """text with the Colab badge link and the clone URL pointing at url."""
    slug = url.removeprefix("https://github.com/")
    text = re.sub(r"colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/",
                  f"colab.research.google.com/github/{slug}/blob/", text)
    return re.sub(r'"git", "clone", "--depth", "1", "https://github\.com/[\w.-]+/[\w.-]+"',
                  f'"git", "clone", "--depth", "1", "{url}"', text)


def sources() -> list[Path]:
    return sorted(NB_DIR.glob("week*/*.py"))


def notebook_of(source: Path) -> nbformat.NotebookNode:
    """The .ipynb for a source: its cells, no outputs, stable cell ids, paired with the .py for jupytext."""
    nb = jupytext.reads(source.read_text(encoding="utf-8"), fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:03d}"  # fixed ids: rewriting an unchanged notebook changes nothing
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata["jupytext"].pop("text_representation", None)
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata.setdefault("colab", {"provenance": []})
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    a = p.parse_args(argv)
    url, stale = repo_url(), []
    for src in sources():
        text = src.read_text(encoding="utf-8")
        if with_repo(text, url) != text:
            stale.append(f"{src.relative_to(ROOT)}: badge or clone URL is not {url}")
            if not a.check:
                src.write_text(with_repo(text, url), encoding="utf-8")
        target = src.with_suffix(".ipynb")
        new = nbformat.writes(notebook_of(src)) + "\n"
        if not target.is_file() or target.read_text(encoding="utf-8") != new:
            stale.append(f"{target.relative_to(ROOT)} differs from {src.name}")
            if not a.check:
                tmp = target.with_suffix(".ipynb.tmp")
                tmp.write_text(new, encoding="utf-8")
                tmp.replace(target)
    for line in stale:
        print(("out of date: " if a.check else "updated: ") + line)
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
