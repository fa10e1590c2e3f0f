"""The figure notebooks run top to bottom on the bundled models (quick setting: 128 images per model)."""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

#: figures each notebook must show when executed
FIGURES = {"01_cka_maps": 3, "02_attention": 5, "03_localization": 4, "04_linear_probes": 1}
NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_cka_maps", "02_attention", "03_localization", "04_linear_probes"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path_factory, monkeypatch):
    book = nbformat.read(path, as_version=4)
    # committed notebooks carry no outputs (small diffs, nothing stale)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{path.name} has outputs"
    stores = tmp_path_factory.getbasetemp() / "notebook_stores"  # shared: later notebooks reuse the stores
    monkeypatch.setenv("REPSIM_NB_N", "128")
    monkeypatch.setenv("REPSIM_NB_OUT", str(stores))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path_factory.mktemp(path.stem))}})
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every figure is shown: image outputs, not "<Figure size ...>" / "<Axes: ...>" text reprs
    images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= FIGURES[path.stem], (path.stem, len(images))
    texts = [o["data"]["text/plain"] for c in book.cells if c.cell_type == "code" for o in c.outputs
             if "text/plain" in o.get("data", {}) and "image/png" not in o.get("data", {})]
    assert not [t for t in texts if t.startswith(("<Figure", "<Axes", "<matplotlib"))], texts
