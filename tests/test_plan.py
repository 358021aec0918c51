"""A run is a plan, then training: prepare(cfg) -> Plan (nothing trained, nothing written), the frozen recipe as
one Plan -> Plan transform, the user's config never swapped, one entry for seeds and presets."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.config import from_dict
from cnnlab.experiments.prepare import prepare
from cnnlab.experiments.run import run_experiment
from cnnlab.models.parts import BackboneModel, is_backbone_model
from cnnlab.records.runs import RunFolder

SMALL = {"data": {"source": "synthetic", "classes": 4, "synthetic_train": 160, "synthetic_test": 40},
         "model": {"name": "basenet"}, "train": {"optimizer": "adam", "epochs": 1, "batch_size": 32, "precision": "fp32"}}


def tiny_backbone() -> nn.Module:
    """A module path backbone for the frozen recipe: (N, 3, 32, 32) -> (N, 6) pooled features."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 32, 32)}
    return net


FROZEN = {"name": "frozen", "data": SMALL["data"],
          "model": {"name": "test_plan:tiny_backbone", "head": [], "standardize_features": True},
          "train": {"optimizer": "adam", "epochs": 3, "batch_size": 32, "freeze_backbone": True, "precision": "fp32"},
          "search": {"weight_decay": [0.0, 0.1]}}


def test_prepare_trains_nothing_writes_nothing_and_keeps_the_users_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(FROZEN)
    before = repr(cfg)
    plan = prepare(cfg, progress="none")
    assert plan.cfg is cfg and repr(cfg) == before               # never replaced, never changed
    assert plan.frozen and plan.trained is plan.model.head        # the transform swapped what trains, not the config
    assert set(plan.chosen) == {"weight_decay"} and plan.train_config.weight_decay == plan.chosen["weight_decay"]
    assert cfg.train.weight_decay == 0.0 and len(plan.extra["search"]) == 2
    assert plan.splits.train.x.ndim == 2                          # cached features, not images
    assert not (tmp_path / "runs").exists()                       # nothing written: no run folder yet


def test_config_toml_is_the_users_config_plus_what_was_chosen_said_as_such(tmp_path):
    out = run_experiment(from_dict(FROZEN), tmp_path / "runs", progress="none")
    text = (out.path / "config.toml").read_text()
    chosen = out.results.extra["chosen"]["weight_decay"]
    assert text.splitlines()[0] == f"# [train] weight_decay = {chosen:g}: chosen on the validation split by [search] (search.json)"
    assert cnnlab.Run(out.path).config.train.weight_decay == chosen
    assert json.loads((out.path / "search.json").read_text())["chosen"] == {"weight_decay": chosen}


def test_a_resumed_search_run_trains_with_what_its_first_attempt_chose(tmp_path, monkeypatch):
    out = run_experiment(from_dict(FROZEN), tmp_path / "runs", progress="none")
    first = json.loads((out.path / "results.json").read_text())
    (out.path / "results.json").unlink()                          # as if killed before the results were written
    import cnnlab.experiments.frozen as frozen
    monkeypatch.setattr(frozen, "search_head", lambda *a, **k: pytest.fail("the search ran again on resume"))
    from cnnlab.config import load_config
    again = run_experiment(load_config(out.path / "config.toml"), tmp_path / "runs", progress="none",
                           resume=RunFolder(out.path))
    assert again.results.extra["chosen"] == first["chosen"] and again.results.test_accuracy == first["test_accuracy"]


def test_the_model_says_whether_it_is_a_backbone_with_a_head():
    from cnnlab.config import TrainConfig
    from cnnlab.training.engine import Trainer

    class LooksLikeOne(nn.Module):          # attribute names alone do not make a backbone model
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.backbone(x))

    class IsOne(LooksLikeOne, BackboneModel):
        pass

    assert not is_backbone_model(LooksLikeOne()) and is_backbone_model(IsOne())
    cfg = TrainConfig(head_epochs=1, epochs=2, precision="fp32")
    assert Trainer(LooksLikeOne(), cfg, torch.device("cpu"), 0).phase_at(0) == "main"
    assert Trainer(IsOne(), cfg, torch.device("cpu"), 0).phase_at(0) == "head"


def test_seeds_mean_n_runs_from_python_too(tmp_path):
    runs = cnnlab.run("practice/01_sgd20", data="synthetic", runs_dir=tmp_path, progress="none", seeds=2,
                      train={"epochs": 1}, **{"data.synthetic_train": 200, "data.synthetic_test": 50})
    assert [r.results["seed"] for r in runs] == [0, 1]
    assert len({r.path for r in runs}) == 2 and all(r.results["status"] == "ok" for r in runs)


def test_one_reader_of_data_presets():
    from cnnlab.config import load_config, read_data_preset
    from cnnlab.configs import config_file
    assert read_data_preset(None) is None
    tables, source = read_data_preset("synthetic")
    assert source.endswith("synthetic.toml") and tables["data"]["source"] == "synthetic"
    cfg = load_config(config_file("practice/01_sgd20"), [], read_data_preset("synthetic"))
    assert cfg.data.source == "synthetic"
