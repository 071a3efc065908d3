"""The notebooks run from top to bottom (on small budgets), and are
committed executed at their own budgets (``make notebooks``), with their
outputs.

Each notebook has one code cell tagged ``parameters`` (its budget); as with
papermill, a cell setting smaller values is inserted right after it, so the
notebook runs as a user runs it, only shorter. A failing cell fails the test
with the cell's traceback.
"""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

# Budgets that keep each notebook around a minute on a 2-core CPU.
SMALL = {
    "01_quickstart.ipynb": "STEPS = 60\nTEST_CLASSES = 40",
    "02_train_and_inspect.ipynb": "EPOCHS = 1\nSTEPS = 20\nMAP_POINTS = 500\nVAL_IMAGES = 1000",
    "03_reproduce_paper.ipynb": "",
    "04_search.ipynb": "EPOCHS = 1\nSTEPS = 30",
}
# Figures each notebook shows: 02 draws the curves (2), the map, the
# gallery, the worst queries and the heatmaps.
FIGURES = {
    "01_quickstart.ipynb": 0,
    "02_train_and_inspect.ipynb": 6,
    "03_reproduce_paper.ipynb": 0,
    "04_search.ipynb": 1,
}
# The folders each notebook leaves in the temporary folder (all of them
# named grouploss-*): 02 and 04 keep their
# run folder for the reader to open; 03 removes its fixtures and smoke runs
# (160 MB a run).
LEFT_IN_TMP = {
    "01_quickstart.ipynb": 0,
    "02_train_and_inspect.ipynb": 1,
    "03_reproduce_paper.ipynb": 0,
    "04_search.ipynb": 1,
}


def _parameters_cell(nb) -> int:
    tagged = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', got {len(tagged)}"
    return tagged[0]


def test_every_notebook_is_tested():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(SMALL) == sorted(FIGURES) == sorted(LEFT_IN_TMP)


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_is_committed_executed(name):
    """Executed top to bottom by ``make notebooks`` at the notebook's own
    budget (no injected parameters), every cell once and in order, without
    errors, with its figures."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    _parameters_cell(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not any("Injected by tests" in c.source for c in code)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == FIGURES[name]
    executed = nb.metadata["grouploss"]["executed"]
    assert {"date", "machine", "seconds"} <= set(executed)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = _parameters_cell(nb)
    if SMALL[name]:
        # The override must only shrink names the notebook defines.
        defined = nb.cells[at].source
        for line in SMALL[name].splitlines():
            assert line.split("=")[0].strip() in defined, line
        injected = nbformat.v4.new_code_cell(
            "# Injected by tests/test_notebooks.py\n" + SMALL[name]
        )
        nb.cells.insert(at + 1, injected)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        # The notebooks find the data and the test fixtures from where they
        # stand; their files go to temporary folders.
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    # The kernel's temporary folder is the test's own, so nothing the
    # notebook writes outlives pytest's clean-up.
    kernel_tmp = tmp_path / "tmp"
    kernel_tmp.mkdir()
    # raises CellExecutionError naming the failing cell
    client.execute(env={**os.environ, "TMPDIR": str(kernel_tmp)})
    left = sorted(kernel_tmp.glob("grouploss*"))
    assert len(left) == LEFT_IN_TMP[name], left
    (tmp_path / name).write_text(nbformat.writes(nb))
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == FIGURES[name]
