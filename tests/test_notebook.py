"""examples/practice.ipynb runs headless, end to end, on small synthetic data for 1 epoch (so it cannot rot).

The notebook's `parameters`-tagged cell is replaced (as papermill would) and the notebook is executed by
nbclient in a Jupyter kernel running this interpreter, in tmp_path, with the isolated environment of
conftest.py (the kernel inherits os.environ).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "practice.ipynb"
SUITE_ROWS = {"norm", "aug", "deep", "bnpre", "bnpost", "es"}


def parameters(runs_dir: Path) -> str:
    # 300 / 100 synthetic images: each of the 8 runs takes about a second at 1 epoch on 2 CPU cores.
    return "\n".join([
        'DATA = "synthetic"',
        "DATA_DIR = None",
        "EPOCHS = 1",
        f"RUNS_DIR = {str(runs_dir)!r}",
        'DATA_OPTIONS = {"synthetic_train": 300, "synthetic_test": 100}',
    ])


def pin_kernel(tmp_path: Path, monkeypatch) -> str:
    """A `python3` kernelspec for this very interpreter, first on JUPYTER_PATH: ipykernel's own spec (found in
    the venv's share/jupyter) would do in a fresh venv, but a JUPYTER_PATH or user-level `python3` spec on a
    developer's machine could point the notebook at another Python."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (cnnlab tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return "python3"


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def pngs(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_practice_notebook_runs_headless(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    for name in ("DATA", "DATA_DIR", "EPOCHS", "RUNS_DIR", "DATA_OPTIONS"):
        assert re.search(rf"^{name} = ", tagged[0].source, re.M), f"the parameters cell no longer sets {name}"
    runs = tmp_path / "runs"
    tagged[0].source = parameters(runs)

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # tiny runs; 2 threads on a shared 2-core machine stall
    client = nbclient.NotebookClient(nb, kernel_name=pin_kernel(tmp_path, monkeypatch), timeout=300,
                                     startup_timeout=120, resources={"metadata": {"path": str(work)}})
    client.execute()       # raises CellExecutionError (with the cell and its traceback) if any cell raised

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    out = "\n".join(text_of(c) for c in code)

    # Every run finished: the two BaseNet runs and the six suite rows, each with its results.json.
    results = {}
    for p in runs.rglob("results.json"):
        r = json.loads(p.read_text())
        results[r["name"]] = (r, p.parent)
    assert set(results) == {"sgd20", "adam20"} | SUITE_ROWS, sorted(results)
    assert {n: r["status"] for n, (r, _) in results.items()} == dict.fromkeys(results, "ok")
    assert all(r["epochs_run"] == 1 for r, _ in results.values())
    suite_dirs = {p.parent.name for n, (_, p) in results.items() if n in SUITE_ROWS}
    assert len(suite_dirs) == 1 and next(iter(suite_dirs)) == "rows"      # one suite folder holds the 6 rows

    # The evaluation printed its top-1 accuracy: that of the best run (same weights, same test images).
    m = re.search(r"^top-1 accuracy: (\d\.\d{4})$", out, re.M)
    assert m, out[-3000:]
    best = max(r["test_accuracy"] for r, _ in results.values())
    assert float(m.group(1)) == pytest.approx(best, abs=0.021)
    assert re.search(r"^top-5 accuracy: \d\.\d{4}$", out, re.M)
    assert "most confused pairs" in out

    # It wrote its files, confusion.png among them, into an eval folder of a run.
    confusion = list(runs.rglob("eval-test/confusion.png"))
    assert len(confusion) == 1 and confusion[0].stat().st_size > 1000
    # The two PNG files written from the test split were labelled (top-3 each).
    assert len(list((runs / "my_images").glob("*.png"))) == 2
    assert len(re.findall(r"^test\d_\S+\.png +top-3: ", out, re.M)) == 2

    # The figures show: curves of both runs, the suite's curves, the predictions, the confusion matrix.
    assert sum(pngs(c) for c in code) >= 5
    for needle in ("sgd.plot()", "adam.plot()", "suite.plot()", "confusion.png"):
        cell = next(c for c in code if needle in c.source)
        assert pngs(cell) == 1, f"the cell with {needle} shows {pngs(cell)} images"
