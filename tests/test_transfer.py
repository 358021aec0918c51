"""Transfer learning: backbones (timm, torchvision, custom), weights files, cached frozen features,
fine-tuning that changes the backbone, and the offline error. Tiny models and random weights only."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.config import ModelConfig, from_dict
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.records.io import read_json
from cnnlab.models.backbones import TransferNet, create_backbone
from cnnlab.models.build import build_model


def tiny_backbone(width: int = 8) -> nn.Module:
    """A custom backbone for `package.module:function` (images -> pooled features)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _cfg(**train) -> dict:
    return {"name": "tl", "data": {"source": "synthetic", "classes": 4, "image_size": 40, "synthetic_train": 160,
                                   "synthetic_test": 40},
            "model": {"name": "test_resnet", "weights": "none", "head": [16], "input_size": 32},
            "train": {"optimizer": "adam", "epochs": 2, "batch_size": 32, "precision": "fp32", **train}}


def test_timm_backbone_random_weights_and_preprocessing():
    model, nf, norm, size = create_backbone("test_resnet", "none")
    assert nf == model.num_features
    assert size == 160                                        # from the model's pretrained config
    assert torch.allclose(norm.mean, torch.tensor([0.5, 0.5, 0.5]))
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, nf)


def test_torchvision_backbone_has_its_own_preprocessing():
    model, nf, norm, size = create_backbone("tv:resnet18", "none")
    assert nf == 512 and size == 224
    assert torch.allclose(norm.std, torch.tensor([0.229, 0.224, 0.225]))


def test_custom_backbone_by_module_path():
    model, nf, _, _ = create_backbone("test_transfer:tiny_backbone", "none", {"width": 5})
    assert nf == 5
    net = TransferNet(model, nf, 3, [7])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    net.reset_classifier(9)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 9)


def test_local_weights_file_is_loaded(tmp_path):
    src, _, _, _ = create_backbone("test_resnet", "none")
    with torch.no_grad():
        for p in src.parameters():
            p.uniform_(-0.1, 0.1)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    loaded, _, _, _ = create_backbone("test_resnet", str(path))
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_file_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(tiny_backbone().state_dict(), path)
    with pytest.raises(CnnlabError, match="does not fit"):
        create_backbone("test_resnet", str(path))


def test_offline_without_cached_weights_says_how_to_provide_a_file(tmp_path):
    """Through the CLI, in a fresh process (the hub reads HF_HUB_OFFLINE when it is imported)."""
    from conftest import run_cli
    cfg = tmp_path / "tl.toml"
    cfg.write_text('[data]\nsource = "synthetic"\nclasses = 4\n[model]\nname = "test_resnet"\nhead = [8]\n')
    proc = run_cli(["run", cfg, "--runs-dir", tmp_path / "runs"], tmp_path / "home",
                   HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    assert proc.returncode == 2, proc.stderr
    assert "weights = '/path/to/file" in proc.stderr and "test_resnet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_backbone_and_tag():
    with pytest.raises(ConfigError, match="not a cnnlab model"):
        build_model(ModelConfig(name="no_such_net_xyz"), 3, 32)
    with pytest.raises(ConfigError, match="not a pretrained tag"):
        create_backbone("resnet18", "no_such_tag")


def test_frozen_features_are_cached_and_reused(tmp_path, monkeypatch):
    cfg = from_dict(_cfg(freeze_backbone=True, epochs=3))
    run1 = run_experiment(cfg, tmp_path / "runs", progress="none")
    assert read_json(run1.path / 'results.json')["features_from_cache"] is False
    # The second run must not run the backbone at all: make extraction impossible.
    import cnnlab.transfer.features as features

    def boom(*a, **k):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(features, "extract", boom)
    run2 = run_experiment(cfg, tmp_path / "runs", progress="none")
    r1, r2 = read_json(run1.path / 'results.json'), read_json(run2.path / 'results.json')
    assert r2["features_from_cache"] is True
    assert r2["test_accuracy"] == r1["test_accuracy"] and r2["test_loss"] == r1["test_loss"]
    assert len(list((Path(features.cache_dir()) / "features").glob("*.npy"))) == 2    # train + test, memory-mapped


def test_feature_cache_depends_on_weights(tmp_path):
    """Another seed gives other random backbone weights: new features, not the cached ones."""
    run_experiment(from_dict(_cfg(freeze_backbone=True)), tmp_path / "runs", progress="none")
    other = from_dict({**_cfg(freeze_backbone=True), "seed": 1})
    assert read_json(run_experiment(other, tmp_path / "runs", progress="none").path / 'results.json')["features_from_cache"] is False


def test_finetuning_epoch_changes_backbone_weights(tmp_path):
    cfg = from_dict({**_cfg(head_epochs=1, backbone_lr_mult=0.5, epochs=2),
                     "augment": {"random_resized_crop": True, "hflip": True}})
    torch.manual_seed(cfg.seed)
    initial, _, _ = build_model(cfg.model, 4, 40)
    run = run_experiment(cfg, tmp_path / "runs", progress="none")
    state = torch.load(run.path / 'checkpoints' / "last.pt", weights_only=True)["model"]
    changed = [k for k, v in initial.state_dict().items()
               if k.startswith("backbone.") and v.dtype.is_floating_point and not torch.equal(v, state[k])]
    assert changed, "the backbone did not train"
    hist = json.loads((run.path / "history.json").read_text())
    assert len(hist) == 2 and read_json(run.path / 'results.json')["status"] == "ok"


def test_head_phase_keeps_backbone_fixed(tmp_path):
    cfg = from_dict({**_cfg(head_epochs=1, epochs=1)})
    torch.manual_seed(cfg.seed)
    initial, _, _ = build_model(cfg.model, 4, 40)
    run = run_experiment(cfg, tmp_path / "runs", progress="none")
    state = torch.load(run.path / 'checkpoints' / "last.pt", weights_only=True)["model"]
    for k, v in initial.state_dict().items():
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, state[k]), k
    assert not torch.equal(initial.state_dict()["head.0.weight"], state["head.0.weight"])


def test_practice_birds_configs_parse():
    from cnnlab.config import load_config
    from cnnlab.configs import suite_files
    rows = [load_config(f) for f in suite_files("practice-birds")]
    assert [r.name for r in rows] == ["birds_frozen", "birds_finetune_practice", "birds_finetune", "birds_frozen_best"]
    frozen = rows[0]
    assert frozen.data.source == "cub200-2010" and frozen.model.name == "resnet50"
    assert frozen.model.head == [400] and frozen.train.freeze_backbone
    assert frozen.train.epochs == 40 and frozen.train.batch_size == 32 and frozen.train.optimizer == "adam"
    assert frozen.report.reference_accuracy == pytest.approx(0.412, abs=1e-3)
    best = rows[3]                       # 01_frozen's task and backbone, cnnlab's frozen-feature recipe
    assert (best.model.name, best.model.weights, best.data.source) == ("resnet50", "tv_in1k", "cub200-2010")
    assert best.model.head == [] and best.model.flip_average and best.model.standardize_features
    assert best.train.freeze_backbone and best.search.C and not best.search.grid() and best.data.val_split == "stratified"


def test_frozen_run_via_cli_on_imagefolder(tmp_path):
    """imagefolder at a non-CIFAR size feeds a backbone through the CLI."""
    from PIL import Image

    from conftest import cli
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            d = tmp_path / "imgs" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(0, 40, (48, 56, 3), generator=g).numpy().astype("uint8")
                Image.fromarray((noise + torch.tensor(colour).numpy()).clip(0, 255).astype("uint8")).save(d / f"{i}.jpg")
    cfg = tmp_path / "tl.toml"
    cfg.write_text(textwrap.dedent(f"""
        name = "tl"
        [data]
        source = "imagefolder"
        data_dir = "{tmp_path / 'imgs'}"
        classes = 0
        image_size = 48
        [model]
        name = "test_resnet"
        weights = "none"
        head = [8]
        input_size = 40
        [train]
        optimizer = "adam"
        epochs = 2
        batch_size = 8
        freeze_backbone = true
    """))
    proc = cli(["run", cfg, "--runs-dir", tmp_path / "runs", "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert res["status"] == "ok" and res["epochs_run"] == 2
