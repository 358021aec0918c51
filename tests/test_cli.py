"""End to end through the `cnnlab` command: a run that learns, its run folder, seeds, suites, reports."""
from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnlab.config import load_config
from cnnlab.models import create_model
from cnnlab.records.runs import HISTORY_KEYS

from conftest import cli, run_cli, synthetic_row

FAST = ["--data", "synthetic", "--set", "data.synthetic_train=600", "--set", "data.synthetic_test=200",
        "--set", "train.epochs=4", "--set", "train.precision=fp32", "-q"]


def _only_run(runs_dir: Path) -> Path:
    runs = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The packaged BatchNorm config on synthetic data, run twice with seed 0 and once with seed 1."""
    base = tmp_path_factory.mktemp("e2e")
    out = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs = base / f"runs-{key}"
        proc = cli(["run", "practice/08_bnpre", *FAST, "--seed", seed, "--runs-dir", runs], base / "home")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[key] = (_only_run(runs), proc)
    return out


def test_run_learns(e2e):
    run, proc = e2e["a"]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "ok"
    assert res["test_accuracy"] > 0.5                  # 10 classes: chance is 0.1
    assert 0 < res["test_loss"] < math.log(10)
    assert res["epochs_run"] == 4 and res["epochs_max"] == 4
    assert res["model"] == "deepnet_bn_pre" and res["optimizer"] == "adam" and res["batch_size"] == 32
    assert f"test accuracy {res['test_accuracy']:.4f}" in proc.stdout
    assert proc.stdout.count("epoch ") >= 4            # -q: one line per epoch
    assert "Traceback" not in proc.stderr


def test_run_folder_outputs(e2e):
    run, _ = e2e["a"]
    # config.toml: the resolved config, re-loadable
    cfg = load_config(run / "config.toml")
    assert cfg.name == "bnpre" and cfg.data.source == "synthetic" and cfg.data.synthetic_train == 600
    assert cfg.train.epochs == 4 and cfg.train.lr == pytest.approx(0.001) and cfg.train.precision == "fp32"
    assert cfg.model.name == "deepnet_bn_pre" and cfg.augment.zoom == pytest.approx(0.2) and cfg.augment.hflip
    assert cfg.seed == 0

    # history.csv / history.json
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for h in history:
        assert set(HISTORY_KEYS) <= set(h)
        assert 0 <= h["accuracy"] <= 1 and 0 <= h["val_accuracy"] <= 1
        assert h["loss"] > 0 and h["val_loss"] > 0 and h["seconds"] > 0
        assert h["lr"] == pytest.approx(0.001)
    assert history[-1]["loss"] < history[0]["loss"]
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
    assert len(rows) == 4
    for row, h in zip(rows, history):
        assert int(row["epoch"]) == h["epoch"]
        for k in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert float(row[k]) == pytest.approx(h[k], rel=1e-9)

    # results.json: best epoch is the first epoch with the highest validation accuracy
    res = json.loads((run / "results.json").read_text())
    accs = [h["val_accuracy"] for h in history]
    assert res["best_epoch"] == accs.index(max(accs)) + 1
    assert res["seed"] == 0 and res["name"] == "bnpre"

    # checkpoints
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert last["epoch"] == 4 and len(last["history"]) == 4
    assert last["identity"]["model"] == "deepnet_bn_pre" and last["identity"]["num_classes"] == 10
    assert best["epoch"] == res["best_epoch"]
    model = create_model("deepnet_bn_pre", 10)
    model.load_state_dict(best["model"])
    model.load_state_dict(last["model"])

    # plots
    for name in ("accuracy.png", "loss.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(run / name) as im:
            im.verify()
        with Image.open(run / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100

    # summary and meta
    params = sum(p.numel() for p in create_model("deepnet_bn_pre", 10).parameters())
    assert params == 113_281 - 15 * 51               # 10 classes instead of 25: 15 fewer outputs of 50 + 1
    summary = (run / "summary.txt").read_text()
    assert f"Trainable params: {params:,}" in summary
    assert f"Total params: {params + 488:,}" in summary     # + BatchNorm moving statistics, as Keras counts
    meta = json.loads((run / "meta.json").read_text())
    assert meta["params"] == params and meta["device"] == "cpu"
    assert "600 train / 200 test images" in meta["data"] and "10 classes" in meta["data"]
    assert len(meta["normalizer"]["mean"]) == 3 and len(meta["normalizer"]["std"]) == 3   # featurewise
    assert "practice/08_bnpre" in " ".join(meta["command"])
    # nothing half-written left behind
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]


def test_same_seed_same_history_other_seed_differs(e2e):
    ha = json.loads((e2e["a"][0] / "history.json").read_text())
    hb = json.loads((e2e["b"][0] / "history.json").read_text())
    hc = json.loads((e2e["c"][0] / "history.json").read_text())
    assert _metrics(ha) == _metrics(hb)
    ra = json.loads((e2e["a"][0] / "results.json").read_text())
    rb = json.loads((e2e["b"][0] / "results.json").read_text())
    assert ra["test_loss"] == rb["test_loss"] and ra["test_accuracy"] == rb["test_accuracy"]
    assert [h["loss"] for h in _metrics(hc)] != [h["loss"] for h in _metrics(ha)]
    rc = json.loads((e2e["c"][0] / "results.json").read_text())
    assert rc["seed"] == 1 and rc["test_loss"] != ra["test_loss"]
    wa = torch.load(e2e["a"][0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(e2e["b"][0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    wc = torch.load(e2e["c"][0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# ---------------------------------------------------------------- suites and reports

def _table_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| experiment"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_suite_report_and_rebuild(tmp_path):
    suite = tmp_path / "mysuite"
    suite.mkdir()
    (suite / "01_slow.toml").write_text(synthetic_row("slow", 0.001, 3, "Adam 0.001"))
    (suite / "02_fast.toml").write_text(synthetic_row("fast", 0.003, 3, "Adam 0.003"))
    runs = tmp_path / "runs"
    proc = cli(["suite", suite, "--runs-dir", runs, "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 runs ok" in proc.stdout
    folder = _only_run(runs)
    assert folder.name.startswith("mysuite-")
    spec = json.loads((folder / "suite.json").read_text())
    assert spec["rows"] == ["slow", "fast"]
    row_dirs = sorted((folder / "rows").iterdir())
    assert [p.name for p in row_dirs] == ["01-slow", "02-fast"]

    report = (folder / "report.md").read_text()
    rows = _table_rows(report)
    assert set(rows) == {"Adam 0.001", "Adam 0.003"}
    for label, row_dir in (("Adam 0.001", row_dirs[0]), ("Adam 0.003", row_dirs[1])):
        res = json.loads((row_dir / "results.json").read_text())
        assert res["status"] == "ok" and res["label"] == label
        cells = rows[label]
        assert cells[1] == "basenet" and cells[2] == "adam" and cells[3] == "3" and cells[4] == "32"
        assert cells[5] == f"{res['test_accuracy']:.4f}"
        assert cells[6] == f"{res['test_top5']:.4f}" and cells[7] == f"{res['test_macro_f1']:.4f}"
        assert cells[8] == f"{res['test_loss']:.4f}"
        assert f"(rows/{row_dir.name}/confusion.png)" in report and f"(rows/{row_dir.name}/errors.png)" in report
        assert cells[-1] == "ok"
        assert f"(rows/{row_dir.name}/accuracy.png)" in report

    # rebuild from the folder alone: no training, same table
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "report.md"}
    (folder / "report.md").unlink()
    proc = cli(["report", folder], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rebuilt = (folder / "report.md").read_text()
    assert _table_rows(rebuilt) == rows
    # everything but the title line is identical
    assert rebuilt.splitlines()[1:] == report.splitlines()[1:]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "report.md"} == stamps
    assert [p.name for p in runs.iterdir()] == [folder.name]


def test_report_of_missing_folder(tmp_path):
    proc = cli(["report", tmp_path / "nowhere"], tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr.startswith("cnnlab: error:") and "nowhere" in proc.stderr


def test_diverging_run(tmp_path):
    cfg = tmp_path / "diverge.toml"
    cfg.write_text(textwrap.dedent("""
        name = "diverge"
        [data]
        source = "synthetic"
        classes = 10
        synthetic_train = 300
        synthetic_test = 100
        [train]
        optimizer = "sgd"
        lr = 1e6
        epochs = 3
        batch_size = 32
        precision = "fp32"
        """))
    runs = tmp_path / "runs"
    proc = cli(["run", cfg, "--runs-dir", runs, "-q"], tmp_path / "home")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIVERGED" in proc.stdout and "lower [train] lr" in proc.stdout
    assert "Traceback" not in proc.stderr
    run = _only_run(runs)
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "diverged"
    assert res["epochs_run"] < 3 or not math.isfinite(json.loads((run / "history.json").read_text())[-1]["loss"])
    assert "lr" in res["reason"]
    history = json.loads((run / "history.json").read_text())
    assert not math.isfinite(history[-1]["loss"])
    assert len(history) == res["epochs_run"]


def test_models_command(tmp_path):
    proc = run_cli(["models"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "24,197" in lines["basenet"]
    assert "112,793" in lines["deepnet"]
    assert "113,769" in lines["deepnet_bn_pre"] and "113,769" in lines["deepnet_bn_post"]
