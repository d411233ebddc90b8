"""The notebooks as committed: written from their jupytext sources, stored without outputs, exercises as stubs.

Running them is `make test-notebooks` (two runs: as shipped, and with course/solutions.py filled in):

    pytest --nbval-lax notebooks/ --nbval-cell-timeout=900 -p no:cacheprovider
    python notebooks/solve.py out/nb-solved && COURSE_STRICT=1 pytest --nbval-lax out/nb-solved ...
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = ["week17/01_data_curation.ipynb", "week17/02_tokenization.ipynb", "week17/03_metrics.ipynb",
            "week17/04_efficient_training.ipynb", "week18/05_training.ipynb", "week18/06_evaluation.ipynb",
            "week18/07_serving.ipynb", "week18/08_scaling.ipynb"]
NOTEBOOKS = sorted(NB_DIR.glob("week*/*.ipynb"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, NB_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _exercise_cells(nb) -> list:
    cells = [c for c in nb.cells if c.cell_type == "code" and "# YOUR CODE" in c.source]
    for c in cells:  # notebooks/solve.py replaces a cell by its first line's names: nothing may come before it
        assert c.source.startswith("# YOUR CODE:"), f"an exercise cell must start with its marker:\n{c.source[:200]}"
    return cells


def test_every_week_notebook_exists_with_its_source():
    assert [p.relative_to(NB_DIR).as_posix() for p in NOTEBOOKS] == EXPECTED
    assert all(p.with_suffix(".py").is_file() for p in NOTEBOOKS)


def test_notebooks_match_their_sources():
    """Each .ipynb is exactly what notebooks/sync.py writes from its .py: edit the .py, then run sync.py."""
    sync = _load("sync")
    for src in sync.sources():
        committed = src.with_suffix(".ipynb").read_text(encoding="utf-8")
        assert committed == nbformat.writes(sync.notebook_of(src)) + "\n", (
            f"{src.with_suffix('.ipynb').name} differs from {src.name}: run `python notebooks/sync.py`")
    assert sync.main(["--check"]) == 0


def test_badge_and_clone_url_come_from_the_one_setting():
    sync = _load("sync")
    url = sync.repo_url()
    slug = url.removeprefix("https://github.com/")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        rel = path.relative_to(NB_DIR).as_posix()
        assert f"colab.research.google.com/github/{slug}/blob/main/notebooks/{rel}" in nb.cells[0].source
        assert f'"{url}"' in nb.cells[1].source
        assert set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", "".join(c.source for c in nb.cells))) <= {slug}
    fork = sync.with_repo(nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source, "https://github.com/me/fork")
    assert '"https://github.com/me/fork"' in fork


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: run `python notebooks/sync.py`"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    """Colab badge first, the Colab-only setup cell, the FAST switch, every exercise a stub followed by its check."""
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and "colab.research.google.com/assets/colab-badge.svg" in cells[0].source
    assert path.relative_to(NB_DIR).as_posix() in cells[0].source  # the badge opens this very notebook
    setup = cells[1].source
    assert '"google.colab" in sys.modules' in setup and "pip" in setup
    assert "torch" not in setup.split("pip", 1)[1].split("\n", 1)[0]  # never reinstalls or replaces torch
    assert "FAST = True" in cells[2].source and "manual_seed" in cells[2].source
    for i, cell in enumerate(cells):
        if cell in _exercise_cells(nb):
            nxt = cells[i + 1]
            assert nxt.cell_type == "code" and "check." in nxt.source, f"{path.name}: exercise {i} has no check"
            assert "raise NotImplementedError(" in cell.source, f"{path.name}: exercise {i} is not a stub"
            assert "assert check." not in nxt.source  # a stub's check must not stop the notebook
    assert len(_exercise_cells(nb)) >= (0 if path.name.startswith("06") else 1)


def test_every_exercise_has_a_solution_and_a_check():
    """>= 20 self-checks in the notebooks; every `# YOUR CODE: names` cell names definitions course/solutions.py has;
    the solved copies replace exactly those cells."""
    from course import check

    solve = _load("solve")
    _, src, _ = solve.definitions()
    checks = set()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in _exercise_cells(nb):
            names = cell.source.split("\n", 1)[0].removeprefix("# YOUR CODE:").split()
            assert names and all(n in src for n in names), names
            stub = {n.name for n in ast.parse(cell.source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            assert stub == set(names), f"{path.name}: the cell defines {stub}, its marker says {names}"
        for cell in nb.cells:
            checks |= {m for m in re.findall(r"check\.(\w+)\(", cell.source) if m not in ("pick", "reference")}
    assert len(checks) >= 20, sorted(checks)
    assert all(callable(getattr(check, c)) for c in checks)


def test_solved_copies(tmp_path):
    solve = _load("solve")
    written = solve.solve(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == EXPECTED
    for path in written:
        nb = nbformat.read(path, as_version=4)
        for cell in _exercise_cells(nb):
            assert "NotImplementedError" not in cell.source
            ast.parse(cell.source)
        shipped = nbformat.read(NB_DIR / path.relative_to(tmp_path), as_version=4)
        assert len(nb.cells) == len(shipped.cells)
        assert sum(a.source != b.source for a, b in zip(nb.cells, shipped.cells)) == len(_exercise_cells(shipped))


def test_fast_mode_never_downloads():
    """FAST cells set the Hub offline, and nothing in the notebooks fetches from the network outside Colab setup."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in nb.cells[2].source
        for cell in nb.cells[3:]:
            if cell.cell_type == "code":
                for word in ("load_dataset(", "from_pretrained(", "urlopen(", "git clone", "wiki_code"):
                    assert word not in cell.source, f"{path.name}: {word!r} outside the Colab setup cell"
