"""Linear probe, then fine-tune: the fine-tuning run starts from the head trained on cached frozen features."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.training.callbacks import Callback
from cnnlab.config import from_dict
from cnnlab.data import load_dataset, split_train_val
from cnnlab.training.engine import Batches
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.records.io import read_json


def tiny_backbone() -> nn.Module:
    """A custom backbone (images -> pooled features) whose random features already separate the classes."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _cfg(**train) -> dict:
    return {"name": "lpft", "data": {"source": "synthetic", "classes": 4, "image_size": 40, "synthetic_train": 160,
                                     "synthetic_test": 40},
            "model": {"name": "test_probe:tiny_backbone", "head": [], "input_size": 32},
            "train": {"optimizer": "sgd", "lr": 0.01, "epochs": 1, "batch_size": 32, "precision": "fp32",
                      "backbone_lr_mult": 0.1, **train}}


class ValAtStart(Callback):
    """Validation accuracy of the model as fine-tuning starts (before its first step)."""

    def __init__(self, val: Batches):
        self.val, self.acc = val, None

    def on_fit_start(self, trainer):
        self.acc = trainer.evaluate(self.val)[1]


def test_finetuning_starts_from_the_probed_head(tmp_path):
    cfg = from_dict(_cfg(probe_epochs=300))
    ds = load_dataset(cfg.data, quiet=True)
    _, va = split_train_val(ds.y_train, cfg.data.val_fraction, cfg.data.val_split, cfg.seed)
    cb = ValAtStart(Batches(ds.x_train[va], ds.y_train[va]))
    out = run_experiment(cfg, tmp_path / "runs", progress="none", callbacks=[cb])
    probe = read_json(out.path / "results.json")["probe"]
    assert 1 <= probe["epochs"] <= 300 and probe["seconds"] > 0
    # The whole model (backbone on images + probed head) scores exactly what the probe scored on the cached
    # features of the same validation images: the head is in place and the features are the model's own.
    assert cb.acc == pytest.approx(probe["val_accuracy"], abs=1e-9)
    assert probe["val_accuracy"] > 0.5                       # 4 classes: it learnt (chance is 0.25)

    plain = ValAtStart(cb.val)
    run_experiment(from_dict(_cfg()), tmp_path / "runs", progress="none", callbacks=[plain])
    assert plain.acc < probe["val_accuracy"]                # without the probe: a random head


def test_probe_is_for_finetuning_only():
    with pytest.raises(ConfigError, match="probe_epochs"):
        from_dict(_cfg(probe_epochs=5, freeze_backbone=True))
    with pytest.raises(ConfigError, match="probe_epochs"):
        from_dict(_cfg(probe_epochs=-1))


def test_freeze_bn_stats_keeps_the_backbones_statistics_while_it_trains(tmp_path):
    raw = _cfg(freeze_bn_stats=True, epochs=1)
    raw["model"] = {"name": "test_resnet", "weights": "none", "head": [], "input_size": 32}
    from cnnlab.models.build import build_model
    cfg = from_dict(raw)
    torch.manual_seed(cfg.seed)
    initial, _, _ = build_model(cfg.model, 4, 40)
    out = run_experiment(cfg, tmp_path / "runs", progress="none")
    state = torch.load(out.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    stats = [k for k in state if k.startswith("backbone.") and ("running_mean" in k or "running_var" in k)]
    weights = [k for k, v in initial.state_dict().items() if k.startswith("backbone.") and k.endswith("weight")]
    assert stats and all(torch.equal(initial.state_dict()[k], state[k]) for k in stats)
    assert any(not torch.equal(initial.state_dict()[k], state[k]) for k in weights)     # the backbone trained

    raw["train"]["freeze_bn_stats"] = False                # default: the statistics follow the new data
    out = run_experiment(from_dict(raw), tmp_path / "runs", progress="none")
    state = torch.load(out.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(initial.state_dict()[k], state[k]) for k in stats)
