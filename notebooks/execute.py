"""Executes the notebooks in place at their own budget (the values of each
notebook's ``parameters`` cell), so that the committed notebooks show
their tables and figures on a code host without running anything.

    make notebooks                              # all of them
    python notebooks/execute.py 04_search.ipynb  # some

Each notebook records in its metadata (``grouploss.executed``) the date,
the machine and the seconds it took. ``make test`` re-runs every notebook
on a smaller budget (``tests/test_notebooks.py``) without writing it.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from machine import describe  # noqa: E402


def execute(path: pathlib.Path) -> float:
    """Runs ``path`` top to bottom and writes it back with its outputs;
    returns the seconds taken. A failing cell raises and leaves the file
    as it was."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    seconds = time.perf_counter() - start
    nb.metadata["grouploss"] = {
        "executed": {
            "date": datetime.date.today().isoformat(),
            "machine": describe(),
            "seconds": round(seconds),
        }
    }
    nbformat.validate(nb)
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    return seconds


def main(names: list) -> int:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name} ...", flush=True)
        print(f"{path.name}: {execute(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
