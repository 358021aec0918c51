"""Imbalanced classes: [train] class_weights, [data] sampler = "balanced", per-class caps, support in the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnlab.config import from_dict
from cnnlab.data.sampler import BalancedSampler
from cnnlab.errors import CnnlabError, ConfigError, RunInterrupted
from cnnlab.experiments.run import run_experiment
from cnnlab.records.runs import RunFolder
from cnnlab.training.callbacks import Callback
from cnnlab.training.weights import class_weights
from conftest import cli

# 5 classes of 200 training images, 5 of 4: the plain run hardly ever predicts the small ones
CAPS = [200] * 5 + [4] * 5


def _imbalanced(name: str, **train) -> dict:
    return {"name": name, "seed": 0,
            "data": {"source": "synthetic", "classes": 10, "synthetic_train": 2000, "synthetic_test": 500,
                     "max_train_per_class": CAPS},
            "model": {"name": "basenet"},
            "train": {"optimizer": "adam", "lr": 0.003, "epochs": 2, "batch_size": 32, "precision": "fp32", **train}}


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_balanced_weights_follow_scikit_learns_rule_and_a_list_needs_one_per_class():
    y = torch.tensor([0] * 6 + [1] * 3 + [2])
    w = class_weights("balanced", y, ["a", "b", "c"])
    assert w.tolist() == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    assert (w[y].mean()).item() == pytest.approx(1.0)          # the loss keeps its scale
    assert class_weights("none", y, ["a", "b", "c"]) is None
    assert class_weights([1, 2, 3], y, ["a", "b", "c"]).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match=r"class_weights lists 2 weights but the data has 3 classes"):
        class_weights([1.0, 2.0], y, ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"needs training images of every class; c has none"):
        class_weights("balanced", torch.tensor([0, 1, 1]), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="class_weights"):
        from_dict({"train": {"class_weights": "inverse"}})


def test_balanced_sampler_draws_each_class_equally_from_seed_and_epoch_alone():
    y = torch.tensor([0] * 50 + [1] * 7 + [2] * 3)
    s = BalancedSampler(y, seed=3)
    a = s.order(4)
    assert len(a) == 60 and int(a.min()) >= 0 and int(a.max()) < 60
    assert torch.bincount(y[a], minlength=3).tolist() == [20, 20, 20]
    # the 3 images of class 2 each appear 6 or 7 times (turns through the class), never 0
    uses = torch.bincount(a, minlength=60)[57:]
    assert uses.sum() == 20 and int(uses.min()) >= 6 and int(uses.max()) <= 7
    # reproducible: a fresh sampler (a resumed process) draws the same; another epoch or seed draws differently
    assert torch.equal(BalancedSampler(y, seed=3).order(4), a)
    assert not torch.equal(s.order(5), a)
    assert not torch.equal(BalancedSampler(y, seed=4).order(4), a)
    # 61 images, 3 classes: the remainder goes to one class
    shares = torch.bincount(torch.tensor([0] * 51 + [1] * 7 + [2] * 3)[BalancedSampler(
        torch.tensor([0] * 51 + [1] * 7 + [2] * 3), 0).order(0)], minlength=3)
    assert sorted(shares.tolist()) == [20, 20, 21]


class _InterruptAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_balanced_weighted_run_resumes_exactly(tmp_path, one_thread):
    base = {"name": "bal", "data": {"source": "synthetic", "classes": 4, "image_size": 16, "synthetic_train": 400,
                                    "synthetic_test": 40, "max_train_per_class": [40, 40, 6, 4], "sampler": "balanced"},
            "model": {"name": "airnet", "args": {"widths": [6, 8]}},
            "train": {"optimizer": "sgd", "lr": 0.05, "epochs": 3, "batch_size": 8, "precision": "fp32",
                      "class_weights": [1.0, 1.0, 2.0, 2.0]}}
    out = run_experiment(from_dict(base), tmp_path / "runs", progress="none")
    with pytest.raises(RunInterrupted) as e:          # killed after epoch 1
        run_experiment(from_dict(base), tmp_path / "killed", progress="none", callbacks=[_InterruptAfter(1)])
    resumed = run_experiment(from_dict(base), tmp_path / "killed", progress="none",
                             resume=RunFolder(Path(str(e.value))))
    strip = lambda h: [{k: v for k, v in x.items() if k not in ("seconds", "threads")} for x in h]  # noqa: E731
    assert strip(resumed.history) == strip(out.history)
    assert resumed.results.test_accuracy == out.results.test_accuracy
    res = json.loads((out.path / "results.json").read_text())
    assert res["class_weights"] == {"class_00": 1.0, "class_01": 1.0, "class_02": 2.0, "class_03": 2.0}
    assert list(res["train_support"].values()) == [36, 36, 5, 3]      # the caps, less the stratified 10% (at least 1)


def test_macro_f1_rises_with_class_weights_and_with_the_balanced_sampler(tmp_path, one_thread):
    """The plain run on 5 large and 5 tiny classes scores the tiny ones badly; weighting the loss or drawing
    the classes evenly lifts macro F1 on the balanced test split (checked on seeds 0-3 while developing)."""
    f1 = {}
    for name, extra in (("plain", {}), ("weights", {"class_weights": "balanced"}), ("sampler", {})):
        raw = _imbalanced(name, **extra)
        if name == "sampler":
            raw["data"]["sampler"] = "balanced"
        out = run_experiment(from_dict(raw), tmp_path / "runs", progress="none")
        f1[name] = out.results.test_macro_f1
        res = json.loads((out.path / "results.json").read_text())
        assert list(res["train_support"].values()) == [180] * 5 + [3] * 5      # 10% held out, at least 1 of each class
        assert ("class_weights" in res) == (name == "weights")
    assert f1["weights"] > f1["plain"] + 0.05, f1
    assert f1["sampler"] > f1["plain"] + 0.05, f1
    # the report's per-class table shows each class's training and test support
    proc = cli(["report", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "class | train images | test support | precision | recall | F1" in report
    assert "\nclass_09 | 3 | 50 | " in report and "\nclass_00 | 180 | 50 | " in report


def test_per_class_caps_need_one_per_selected_class(tmp_path):
    raw = _imbalanced("caps")
    raw["data"]["max_train_per_class"] = [10, 10]
    with pytest.raises(CnnlabError, match=r"max_train_per_class lists 2 caps but 10 classes are selected"):
        run_experiment(from_dict(raw), tmp_path / "runs", progress="none")
    with pytest.raises(ConfigError, match="max_train_per_class"):
        from_dict({"data": {"max_train_per_class": [10, -1]}})
