"""The notebooks (jupytext percent sources in notebooks/) execute headless on a
small system. They are converted with jupytext and run by nbclient in a real
kernel, as a reader would run them.

Each source ships with a generated ``.ipynb`` beside it (outputs stripped) so
that the notebooks open in plain Jupyter, without jupytext. The ``.py`` is the
source of truth; after editing it, regenerate with

    jupytext --to ipynb notebooks/0*.py

and the sync test below checks that every cell of the ``.ipynb`` matches. Only
the ``.py`` are executed (the ``.ipynb`` hold the same cells)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.py"))

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REGENERATE = "regenerate it from the .py source: jupytext --to ipynb notebooks/0*.py"


# 02 and 04 (a minute each on 2 cores) run with -m slow; 01 (the paper) and 03 stay in the default run.
SLOW_NOTEBOOKS = ("02_explore", "04_design")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    # 32 particles: every cell still runs (relax, derivatives, figure, checks) in seconds.
    monkeypatch.setenv("MDSENS_NOTEBOOK_N", "32")
    # Headless: the inline backend renders with Agg and hands PNGs to the notebook.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("DISPLAY", raising=False)
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook should draw at least one figure"


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_reproduce_paper.py", "02_explore.py", "03_jamming.py", "04_design.py"]
    shipped = sorted(p.name for p in NOTEBOOKS[0].parent.glob("*.ipynb"))
    assert shipped == [p.with_suffix(".ipynb").name for p in NOTEBOOKS], "one .ipynb per .py source, no other"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ipynb_matches_its_source(path):
    """The committed .ipynb has exactly the cells of the .py (same types, same
    code and text, same order), no outputs, and is a valid notebook."""
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; {REGENERATE}"
    committed = nbformat.read(ipynb, as_version=4)
    nbformat.validate(committed)
    source, shipped = _cells(jupytext.read(path)), _cells(committed)
    for k, (want, got) in enumerate(zip(source, shipped)):
        assert got == want, f"{ipynb.name}, cell {k} differs from {path.name}; {REGENERATE}"
    assert len(shipped) == len(source), f"{ipynb.name} has {len(shipped)} cells, {path.name} {len(source)}; " \
                                        f"{REGENERATE}"
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), \
        f"{ipynb.name} should be committed without outputs; {REGENERATE}"
    assert committed.metadata.get("kernelspec", {}).get("name") == "python3"
