"""The notebooks as committed: generated from notebooks/build_notebooks.py, stored without outputs, well formed.

Running them is a separate pytest invocation (each takes a minute or two on 2 cores):

    pytest --nbval-lax notebooks/ --nbval-cell-timeout=300 -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = ["week17/01_data_curation.ipynb", "week17/02_tokenization.ipynb", "week17/03_metrics.ipynb",
            "week17/04_efficient_training.ipynb", "week18/05_training.ipynb", "week18/06_evaluation.ipynb",
            "week18/07_serving.ipynb"]
NOTEBOOKS = sorted(NB_DIR.glob("week*/*.ipynb"))


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_week_notebook_exists():
    assert [p.relative_to(NB_DIR).as_posix() for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them (rebuild the notebooks)"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    """Colab badge first, the Colab-only setup cell, the FAST switch, and every exercise followed by its check."""
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and "colab.research.google.com/assets/colab-badge.svg" in cells[0].source
    assert path.relative_to(NB_DIR).as_posix() in cells[0].source  # the badge opens this very notebook
    setup = cells[1].source
    assert '"google.colab" in sys.modules' in setup and "pip" in setup
    assert "torch" not in setup.split("pip", 1)[1].split("\n", 1)[0]  # never reinstalls or replaces torch
    assert "FAST = True" in cells[2].source and "manual_seed" in cells[2].source
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and "# YOUR CODE" in cell.source:
            nxt = cells[i + 1]
            assert nxt.cell_type == "code" and "check." in nxt.source, f"{path.name}: exercise {i} has no check"
    assert sum("# YOUR CODE" in c.source for c in cells if c.cell_type == "code") >= (
        0 if path.name.startswith("06") else 1)


def test_notebooks_match_their_generator(tmp_path):
    """The committed files are exactly what build_notebooks.py writes: edit the generator, not the .ipynb."""
    written = _load_builder().build(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == EXPECTED
    for p in written:
        committed = NB_DIR / p.relative_to(tmp_path)
        assert json.loads(p.read_text()) == json.loads(committed.read_text()), (
            f"{committed} differs from the generator's output: run `python notebooks/build_notebooks.py`")


def test_fast_mode_never_downloads():
    """FAST cells set the Hub offline, and nothing in the notebooks fetches from the network outside Colab setup."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in nb.cells[2].source
        for cell in nb.cells[3:]:
            if cell.cell_type == "code":
                for word in ("load_dataset(", "from_pretrained(", "urlopen(", "git clone", "wiki_code"):
                    assert word not in cell.source, f"{path.name}: {word!r} outside the Colab setup cell"
