"""Copies of the notebooks with every exercise filled in from course/solutions.py, for CI's second run.

    python notebooks/solve.py out/nb-solved      # then: COURSE_STRICT=1 pytest --nbval-lax out/nb-solved

An exercise cell starts with `# YOUR CODE: name [name ...]`; its copy holds the definitions of those names in
course/solutions.py (plus the private helpers they use and that module's imports), as a learner who solved it
would have written. Nothing else changes, so the solved notebook runs the same cells on the learner's code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat

NB_DIR = Path(__file__).resolve().parent
SOLUTIONS = NB_DIR.parent / "course" / "solutions.py"
MARK = "# YOUR CODE:"


def definitions() -> tuple[str, dict[str, str], dict[str, set[str]]]:
    """(the module's import lines, name -> source of its top-level def/class, name -> names it refers to)."""
    text = SOLUTIONS.read_text(encoding="utf-8")
    tree = ast.parse(text)
    imports = "\n".join(ast.get_source_segment(text, n) for n in tree.body
                        if isinstance(n, (ast.Import, ast.ImportFrom)) and n.names[0].name != "annotations")
    src, uses = {}, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            src[node.name] = ast.get_source_segment(text, node)
            uses[node.name] = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return imports, src, uses


def solved_cell(first_line: str, imports: str, src: dict[str, str], uses: dict[str, set[str]]) -> str:
    names = first_line.removeprefix(MARK).split()
    missing = [n for n in names if n not in src]
    if missing:
        raise SystemExit(f"course/solutions.py has no {', '.join(missing)} for the cell marked {first_line!r}")
    helpers = sorted({u for n in names for u in uses[n] if u.startswith("_") and u in src})
    body = "\n\n\n".join(src[n] for n in helpers + names)
    return f"{first_line}\n{imports}\n\n\n{body}\n"


def solve(out_dir: Path) -> list[Path]:
    imports, src, uses = definitions()
    written = []
    for path in sorted(NB_DIR.glob("week*/*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            first = cell.source.split("\n", 1)[0]
            if cell.cell_type == "code" and first.startswith(MARK):
                cell.source = solved_cell(first, imports, src, uses)
        target = out_dir / path.relative_to(NB_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python notebooks/solve.py OUT_DIR")
    for p in solve(Path(sys.argv[1])):
        print("wrote", p)
