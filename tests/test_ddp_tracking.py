"""Data-parallel runs under torchrun (2 CPU processes, gloo) and the optional trackers (real libraries)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, subprocess_env

CFG = """
name = "dp"
seed = 1
[data]
source = "synthetic"
classes = 10
synthetic_train = 1000
synthetic_test = 300
[model]
name = "basenet"
[train]
optimizer = "sgd"
lr = 0.05
epochs = 3
batch_size = 64
precision = "fp32"
[augment]
zoom = 0.2
hflip = true
"""

# Tolerance of the DDP-vs-single-process comparison. The two differ only in float summation order
# (per-shard gradient sums, then an all-reduce): the first epochs agree to ~1e-7. SGD at lr 0.05 then
# amplifies those last-bit differences (seen here: identical to 1e-7 through epoch 2, 0.6% apart in loss
# at epoch 3, and the same numbers from the code before the callback rewrite), so the tight bound holds
# for the first epoch and the later epochs are compared as trajectories, not bits.
LOSS_RTOL = 1e-3
LATER_LOSS_RTOL = 0.03
ACC_ATOL = 0.01
LATER_ACC_ATOL = 0.05


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    cfg = tmp_path / "dp.toml"
    cfg.write_text(CFG)
    single = run_cli(["run", cfg, "--runs-dir", tmp_path / "single", "-q"], tmp_path / "home")
    assert single.returncode == 0, single.stderr
    env = subprocess_env(tmp_path / "home", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cnnlab", "run", str(cfg), "--runs-dir", str(tmp_path / "ddp"), "-q"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = list((tmp_path / "ddp").iterdir())
    assert len(runs) == 1                                   # one process writes outputs
    ddp_run, single_run = runs[0], next((tmp_path / "single").iterdir())
    assert json.loads((ddp_run / "meta.json").read_text())["world_size"] == 2
    h1 = json.loads((single_run / "history.json").read_text())
    h2 = json.loads((ddp_run / "history.json").read_text())
    assert len(h1) == len(h2) == 3
    for i, (a, b) in enumerate(zip(h1, h2)):
        rtol, atol = (LOSS_RTOL, ACC_ATOL) if i == 0 else (LATER_LOSS_RTOL, LATER_ACC_ATOL)
        for k in ("loss", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=rtol), (k, a, b)
        for k in ("accuracy", "val_accuracy"):
            assert abs(a[k] - b[k]) <= atol, (k, a, b)
    r1 = json.loads((single_run / "results.json").read_text())
    r2 = json.loads((ddp_run / "results.json").read_text())
    assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=LATER_LOSS_RTOL)
    assert abs(r2["test_accuracy"] - r1["test_accuracy"]) <= LATER_ACC_ATOL


def test_shards_cover_a_batch_exactly_once():
    from cnnlab.distributed import DistInfo
    for world in (1, 2, 3, 4):
        for n in (0, 1, 5, 64, 65):
            parts = [DistInfo(r, world).shard(n) for r in range(world)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))


def test_tensorboard_and_mlflow_loggers(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # reading the local store back, as cnnlab writes it
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    cfg = tmp_path / "dp.toml"
    cfg.write_text(CFG.replace("epochs = 3", "epochs = 2"))
    proc = run_cli(["run", cfg, "--runs-dir", tmp_path / "runs", "-q", "--logger", "tensorboard", "--logger", "mlflow"],
                   tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("dp-"))
    history = json.loads((run / "history.json").read_text())

    # TensorBoard: read the event file back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert losses == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert acc.Scalars("test_accuracy")[0].value == pytest.approx(json.loads((run / "results.json").read_text())["test_accuracy"])

    # MLflow: query the local store with MLflow's client.
    import mlflow
    mlflow.set_tracking_uri((tmp_path / "runs" / "mlruns").as_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cnnlab")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.params["train.optimizer"] == "sgd"
    steps = client.get_metric_history(mrun.info.run_id, "val_accuracy")
    assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx([h["val_accuracy"] for h in history])
    assert mrun.data.metrics["test_accuracy"] == pytest.approx(json.loads((run / "results.json").read_text())["test_accuracy"])


def test_unknown_logger_is_a_config_error(tmp_path):
    cfg = tmp_path / "dp.toml"
    cfg.write_text(CFG + '\n[tracking]\nloggers = ["wandb"]\n')
    proc = run_cli(["run", cfg, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2 and "loggers" in proc.stderr and str(cfg) in proc.stderr
