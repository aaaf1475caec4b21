"""Executes every notebook in notebooks/ headless (trained_model.ipynb against the shipped models/wsram_q_cv.npz
and the offline MNIST copy of `make data`), and checks that git holds them with outputs stripped."""
import json
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
  cells = json.loads(path.read_text())["cells"]
  for cell in cells:
    if cell["cell_type"] == "code":
      assert not cell.get("outputs"), f"{path.name} is committed with outputs; clear them."
      assert cell.get("execution_count") is None, f"{path.name} has execution counts; clear them."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.
