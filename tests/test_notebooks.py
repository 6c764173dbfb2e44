"""The notebooks (jupytext percent sources in notebooks/) execute headless on a
small system. They are converted with jupytext and run by nbclient in a real
kernel, as a reader would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.py"))

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
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
    assert [p.name for p in NOTEBOOKS] == ["01_reproduce_paper.py", "02_explore.py"]
