"""examples/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel (nbclient).

The kernel is this interpreter (a kernel spec written to a temporary JUPYTER_PATH), with
the repository on its path, so the test works on a fresh machine where only
``pip install -e .[test]`` ran and never picks up some other installed ``python3`` kernel.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "hessdiag-test"


@pytest.fixture
def kernel_spec(tmp_path, monkeypatch):
    folder = tmp_path / "kernels" / KERNEL
    folder.mkdir(parents=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "hessdiag test", "language": "python",
            "env": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}}
    (folder / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_quickstart_notebook_executes(kernel_spec):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, kernel_name=kernel_spec, timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # The result object renders as an HTML table with one row per tensor and the total.
    tables = [o["data"]["text/html"] for c in code for o in _outputs(c, "text/html")]
    assert len(tables) == 2 and all("<table>" in t and "<td>total</td>" in t for t in tables)
    assert "<td>1.weight</td>" in tables[0] and "<td>5.bias</td>" in tables[0]
    # The per-layer figure is displayed inline.
    assert any(_outputs(c, "image/png") for c in code)
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "5,962 parameters" in text and "measuring on 64 test examples" in text
    assert "relative difference" in text and '"normalized_norm"' in text
