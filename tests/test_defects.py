"""Defects that lost a user's results (issue 24, item 5): fused SGD with head epochs, thread counts that
followed the load with no way to pin them, and a packaged recipe that could not be shortened."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from cnnlab.config import TrainConfig, from_dict, load_config, to_dict
from cnnlab.configs import config_file
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.models.parts import BackboneModel
from cnnlab.runtime import threads
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import Trainer
from conftest import cli, synthetic_row


# ---------------------------------------------------------------- head epochs with every optimizer

class _Weights(Callback):
    """The backbone's and the head's parameters at the start and after every epoch."""

    def __init__(self):
        self.backbone, self.head = [], []

    def _keep(self, trainer):
        for part, out in ((trainer.model.backbone, self.backbone), (trainer.model.head, self.head)):
            out.append([p.detach().clone() for p in part.parameters()])

    def on_fit_start(self, trainer):
        self._keep(trainer)

    def on_epoch_end(self, trainer, logs):
        self._keep(trainer)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer, extra", [("sgd", {"momentum": 0.9}),
                                              ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
                                              ("adam", {}), ("adamw", {"weight_decay": 0.01})])
def test_head_epochs_freeze_the_backbone_then_train_it_with_every_optimizer(tmp_path, optimizer, extra):
    """The issue's config: timm resnet18 without weights, 2 head-only epochs of 6. Fused SGD with momentum
    crashed at the first step of epoch 3 (the backbone's momentum buffers start then, the head's before)."""
    cfg = from_dict({"name": "ft", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 64,
                                            "synthetic_test": 16},
                     "model": {"name": "resnet18", "weights": "none", "input_size": 32},
                     "train": {"optimizer": optimizer, **extra, "head_epochs": 2, "epochs": 6, "batch_size": 16,
                               "precision": "fp32"}})
    weights = _Weights()
    out = run_experiment(cfg, tmp_path / "runs", progress="none", callbacks=[weights])
    assert out.results.status == "ok" and out.results.epochs_run == 6
    b, h = weights.backbone, weights.head
    assert _same(b[0], b[1]) and _same(b[1], b[2])                 # head epochs: the backbone is frozen
    assert not _same(h[0], h[1]) and not _same(h[1], h[2])         # ... and the head trains
    assert all(not _same(b[e - 1], b[e]) for e in range(3, 7))     # then everything trains


class _Tiny(BackboneModel):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_a_checkpoint_saved_with_fused_sgd_resumes_without_it():
    """last.pt of a run made before the fix says fused = True in its optimizer groups; resuming it with a head
    phase must not bring fused SGD back (the crash again at the first full step)."""
    old = Trainer(_Tiny(), TrainConfig(optimizer="sgd", momentum=0.9, precision="fp32"), torch.device("cpu"), 0)
    assert all(g["fused"] for g in old.optimizer.param_groups)     # no head phase: fused is safe and kept
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, head_epochs=1, epochs=2, precision="fp32")
    new = Trainer(_Tiny(), cfg, torch.device("cpu"), 0)
    new.load_state_dict(old.state_dict())
    assert not any(g["fused"] for g in new.optimizer.param_groups)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    new.model.set_backbone_trainable(False)                        # a head step: head buffers start
    nn.functional.cross_entropy(new.model(x), y).backward()
    new.optimizer.step()
    new.model.set_backbone_trainable(True)                         # then the backbone's, in the same group
    new.optimizer.zero_grad()
    nn.functional.cross_entropy(new.model(x), y).backward()
    new.optimizer.step()


# ---------------------------------------------------------------- pinned thread counts

@pytest.fixture
def free_threads(monkeypatch):
    """Two threads, no OMP_NUM_THREADS, and the thread module's state (deterministic mode included) undone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    n = torch.get_num_threads()
    threads.reset()
    torch.set_num_threads(2)
    yield
    threads.reset()
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def fake_load(monkeypatch, cores: float) -> dict:
    """Other processes keep load['cores'] cores busy (changeable later) on a 2-core machine; snapshots 1 s apart;
    on_step never measures on its own (no timing in the tests)."""
    load = {"cores": cores, "t": 0.0, "busy": 0.0}
    monkeypatch.setattr(threads, "PROBE_S", 0.0)
    monkeypatch.setattr(threads, "CHECK_EVERY_S", 1e9)
    monkeypatch.setattr(threads, "cpu_capacity", lambda: 2.0)

    def snap():
        load["t"] += 1.0
        load["busy"] += load["cores"]
        return threads.Snapshot(load["t"], load["busy"], 0.0)
    monkeypatch.setattr(threads, "snapshot", snap)
    return load


def test_a_pinned_thread_count_never_follows_the_load(free_threads, monkeypatch):
    load = fake_load(monkeypatch, cores=1.0)                       # following, this gives 1 thread
    assert threads.configure(None, "cpu", pin=2) == 2 and torch.get_num_threads() == 2
    for cores in (1.0, 0.0, 1.6):
        load["cores"] = cores
        threads._state.next_check = 0.0                            # on_step would measure now
        assert threads.on_step() is None
        assert threads.on_epoch_end(None, 1.0) == 2 and torch.get_num_threads() == 2
        assert threads.epoch_threads() == 2
    assert threads.summary()["pinned"] == 2
    # deterministic without a count: the process's own count, fixed, and torch's deterministic algorithms
    threads.reset()
    torch.set_num_threads(2)
    assert threads.configure(None, "cpu", deterministic=True) == 2
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert threads.on_epoch_end(None, 1.0) == 2                    # one busy core, still 2
    # the next run without the switch follows the load again, with torch's default algorithms
    assert threads.configure(None, "cpu") == 1 and not torch.are_deterministic_algorithms_enabled()


def _row(**train) -> dict:
    return {"name": "thr", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 128, "synthetic_test": 32},
            "model": {"name": "basenet"},
            "train": {"optimizer": "adam", "epochs": 3, "batch_size": 32, "precision": "fp32", **train}}


class _LoadGoesAway(Callback):
    def __init__(self, load):
        self.load = load

    def on_epoch_end(self, trainer, logs):
        self.load["cores"] = 0.0


def test_the_run_folder_records_each_epochs_threads_and_a_pinned_run_keeps_its_count(free_threads, monkeypatch,
                                                                                     tmp_path):
    load = fake_load(monkeypatch, cores=1.0)       # busy at the start, idle from the end of epoch 1 on
    out = run_experiment(from_dict(_row()), tmp_path / "runs", progress="none", callbacks=[_LoadGoesAway(load)])
    history = json.loads((out.path / "history.json").read_text())
    assert [h["threads"] for h in history] == [1, 1, 2]          # measured after epochs 1 and 2
    load["cores"] = 1.0
    out = run_experiment(from_dict(_row(threads=2)), tmp_path / "runs", progress="none",
                         callbacks=[_LoadGoesAway(load)])
    history = json.loads((out.path / "history.json").read_text())
    assert [h["threads"] for h in history] == [2, 2, 2]
    assert load_config(out.path / "config.toml").train.threads == 2


def test_threads_must_be_zero_or_more_and_deterministic_is_a_flag(tmp_path):
    with pytest.raises(ConfigError, match="'threads' must be >= 0"):
        from_dict({"train": {"threads": -1}})
    assert from_dict({"train": {"threads": 3}}).train.threads == 3
    cfg = tmp_path / "row.toml"
    cfg.write_text(synthetic_row("det", 0.001, 1))
    try:
        proc = cli(["run", cfg, "--deterministic", "--runs-dir", tmp_path / "runs", "-q"], tmp_path / "home")
        assert proc.returncode == 0, proc.stderr
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        threads.reset()
        torch.use_deterministic_algorithms(False)
    run = next((tmp_path / "runs").iterdir())
    assert load_config(run / "config.toml").train.deterministic
    assert json.loads((run / "history.json").read_text())[0]["threads"] == 1     # cli() runs at one thread


# ---------------------------------------------------------------- a shortened recipe

def test_a_shortened_packaged_recipe_caps_its_warmup_with_a_note():
    cfg = load_config(config_file("best"), ["train.epochs=2"])
    assert cfg.train.warmup_epochs == 3 and cfg.train.effective_warmup_epochs == 1.0
    (note,) = cfg.notes()
    assert "warmup_epochs = 3" in note and "epochs = 2" in note and "(1 epoch)" in note
    assert to_dict(cfg)["train"]["warmup_epochs"] == 3             # the file's value; a rerun caps it again
    assert load_config(config_file("best"), ["train.epochs=1"]).train.effective_warmup_epochs == 0.5
    assert load_config(config_file("best")).notes() == []          # as packaged: nothing changes
    with pytest.raises(ConfigError, match="warmup_epochs"):
        from_dict({"train": {"warmup_epochs": -1.0}})
    with pytest.raises(ConfigError, match=r"--set train.head_epochs=1\b"):   # the exact --set that fixes it
        from_dict({"train": {"epochs": 3, "head_epochs": 5}})


def test_cnnlab_run_best_with_two_epochs_runs_and_says_so(tmp_path):
    proc = cli(["run", "best", "--data", "synthetic", "--set", "train.epochs=2", "--set", "data.synthetic_train=256",
                "--set", "data.synthetic_test=64", "--set", "train.precision=fp32", "--runs-dir", tmp_path / "runs",
                "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    (warning,) = [i for i, line in enumerate(lines) if line.startswith("warning: best: [train] warmup_epochs = 3")]
    assert warning < min(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))   # at the start
    run = next((tmp_path / "runs").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok" and results["epochs_run"] == 2
    assert [w for w in results["warnings"] if "warmup_epochs = 3" in w] == [lines[warning].split(": ", 2)[2]]
    lrs = [h["lr"] for h in json.loads((run / "history.json").read_text())]
    assert lrs == [pytest.approx(0.1), pytest.approx(0.0, abs=1e-12)]   # one-cycle: up over epoch 1, down over 2
