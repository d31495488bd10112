"""The cluster-session notebook runs end to end (nbclient, a real kernel) on a tiny generated set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from .conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "cluster_session.ipynb"


def _kernel_for_this_python(tmp: Path) -> Path:
    """A ``python3`` kernelspec that runs this interpreter (the installed one says just ``python``, from PATH)."""
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jungletrap tests)", "language": "python",
    }))
    return tmp / "jupyter"


def test_cluster_session_notebook(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_dataset, run_root=tmp_path / "runs")
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_for_this_python(tmp_path)))
    monkeypatch.setenv("JUNGLETRAP_CONFIG", str(config))
    monkeypatch.setenv("JUNGLETRAP_OVERRIDES", "run.name=notebook;cluster.n_workers=2")
    monkeypatch.delenv("JUNGLETRAP_SCHEDULER", raising=False)
    monkeypatch.delenv("JUNGLETRAP_SCHEDULER_FILE", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable  # the kernel ran this venv's python
    html = "".join(out.get("data", {}).get("text/html", "") for out in outputs)
    assert "Dask dashboard: <a href=\"http://127.0.0.1:" in html and "cpu cluster, 2 workers" in html
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the plots were drawn
    run_dir = tmp_path / "runs" / "notebook"
    sub = pd.read_csv(run_dir / "submission.csv")
    assert len(sub) == len(pd.read_csv(tiny_dataset / "submission_format.csv"))
    assert (run_dir / "perf" / "embed.html").is_file()
