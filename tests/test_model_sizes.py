"""The practice's nets fit any image size: the first dense layer is sized from the input (Keras's Flatten-Dense),
the 32x32 counts and initial weights stay the seed's, and an input too small is one clear error."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnlab
from cnnlab.api import load_model
from cnnlab.config import from_dict
from cnnlab.errors import ConfigError
from cnnlab.models import create_model, summary
from cnnlab.models.build import build_model
from cnnlab.models.cifar import keras_param_count

from conftest import cli

NETS = ["basenet", "deepnet", "deepnet_bn_pre", "deepnet_bn_post"]
KERAS_32 = {"basenet": 24_197, "deepnet": 112_793, "deepnet_bn_pre": 113_769, "deepnet_bn_post": 113_769}
# sha256 of `torch.manual_seed(0); net(25).state_dict()` (names and bytes, in order), recorded before the nets
# learned to size their dense layer: the seed's RNG stream, and so every practice run's start, is unchanged.
INIT_SHA256 = {
    "basenet": "4a464be072c3c8e6000af829e6563f8495b2394386298c2776ea4290d992912f",
    "deepnet": "c4b136d316ca841581c27a9844218ca8e6ecf07c8acaa0fa46ba26b7c928cdc6",
    "deepnet_bn_pre": "d95bc6b7ad90182e196bc0ec8793956d67ed156e21707ce6f1a6a8f7c1d88671",
    "deepnet_bn_post": "2f138809c5cb0abc6854cfb67c3c5cbbc87a858dcd13fa6fc58d9ecc5df27b2b",
}
# The smallest side each net takes, and the layer that empties one pixel below it (Sequential index, type).
SMALLEST = {"basenet": (16, "layer 4 (MaxPool2d)"), "deepnet": (16, "layer 10 (MaxPool2d)"),
            "deepnet_bn_pre": (16, "layer 15 (MaxPool2d)"), "deepnet_bn_post": (16, "layer 16 (MaxPool2d)")}


def _sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _first_dense(model: nn.Module) -> nn.Linear:
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


def _features(model: nn.Sequential) -> nn.Sequential:
    """The convolutional part: everything before Flatten."""
    return model[:[i for i, m in enumerate(model) if isinstance(m, nn.Flatten)][0]]


@pytest.mark.parametrize("name", NETS)
def test_counts_and_initial_weights_at_32_are_the_seeds(name):
    torch.manual_seed(0)
    default = create_model(name, 25)
    assert keras_param_count(default) == KERAS_32[name]
    assert _sha256(default) == INIT_SHA256[name]
    torch.manual_seed(0)                                   # built for 32 explicitly: the same net
    assert _sha256(create_model(name, 25, image_size=32)) == INIT_SHA256[name]
    assert _first_dense(default).in_features == (16 if name == "basenet" else 32) * 5 * 5


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("size", [32, 64, 128, 45])
def test_builds_and_runs_at_any_size(name, size):
    model = create_model(name, 25, image_size=size).eval()
    with torch.no_grad():
        flat = _features(model)(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
        out = model(torch.randn(2, 3, size, size))
    assert _first_dense(model).in_features == flat        # the arithmetic agrees with PyTorch's own shapes
    assert out.shape == (2, 25) and torch.isfinite(out).all()


def test_basenet_counts_at_128_as_keras_would():
    # conv5 -> 124, pool -> 62, conv5 -> 58, pool -> 29: the 16 x 29 x 29 = 13,456 inputs of the error
    model, _, size = build_model(from_dict({"model": {"name": "basenet"}}).model, 25, 128)
    expected = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (13_456 * 50 + 50) + (50 * 25 + 25)
    assert size == 128 and keras_param_count(model) == expected == 676_997
    assert "Total params: 676,997" in summary(model, (3, 128, 128))


@pytest.mark.parametrize("name", NETS)
def test_too_small_names_the_layer_and_the_smallest_size(name):
    smallest, layer = SMALLEST[name]
    with pytest.raises(ConfigError) as e:
        create_model(name, 25, image_size=smallest - 1)
    msg = str(e.value)
    assert "\n" not in msg and layer in msg and f"image_size >= {smallest}" in msg and name in msg
    model = create_model(name, 25, image_size=smallest).eval()      # the smallest really works ...
    with torch.no_grad():
        assert model(torch.zeros(1, 3, smallest, smallest)).shape == (1, 25)
        with pytest.raises(RuntimeError):                           # ... and PyTorch itself fails one pixel below
            _features(model)(torch.zeros(1, 3, smallest - 1, smallest - 1))


def test_a_valid_convolution_that_empties_is_named_too():
    # deepnet at 13: conv5 -> 9, pool -> 4, two padded conv3 -> 4, then the valid conv5 (layer 9) has nothing left
    with pytest.raises(ConfigError, match=r"layer 9 \(Conv2d\) would make them 0x0; use \[data\] image_size >= 16"):
        create_model("deepnet", 25, image_size=13)


def test_image_size_goes_only_to_functions_that_take_it():
    # resnet9s and airnet pool adaptively and have no image_size argument: the same net at any size
    torch.manual_seed(0)
    a = create_model("resnet9s", 25, image_size=64, width=8)
    torch.manual_seed(0)
    b = create_model("resnet9s", 25, width=8)
    assert _sha256(a) == _sha256(b)
    with pytest.raises(ConfigError, match=r"\[model.args\] image_size.*\[data\] image_size"):
        build_model(from_dict({"model": {"name": "basenet", "args": {"image_size": 64}}}).model, 25, 32)


def test_models_command_shows_the_32_counts(tmp_path):
    proc = cli(["models"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.split()[:1] != []}
    assert {name: rows[name] for name in NETS} == {name: f"{n:,}" for name, n in KERAS_32.items()}


def test_too_small_through_the_cli_is_one_line(tmp_path):
    proc = cli(["run", "practice/01_sgd20", "--data", "synthetic", "--set", "data.image_size=12",
                "--set", "data.synthetic_train=40", "--set", "data.synthetic_test=20", "-q",
                "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("cnnlab: error: 12x12 images are too small for basenet: layer 3 (Conv2d) would "
                                   "make them 0x0; use [data] image_size >= 16")


def test_practice_run_at_48_trains_rebuilds_and_predicts(tmp_path):
    runs = tmp_path / "runs"
    proc = cli(["run", "practice/01_sgd20", "--data", "synthetic", "--set", "data.image_size=48",
                "--set", "data.synthetic_train=200", "--set", "data.synthetic_test=40", "--set", "train.epochs=2",
                "--set", "train.precision=fp32", "--set", "train.batch_size=32", "-q", "--runs-dir", runs],
               tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = next(p for p in runs.iterdir() if p.is_dir())
    # 48 -> conv5 44 -> pool 22 -> conv5 18 -> pool 9: a dense layer of 16 x 9 x 9 inputs; synthetic: 10 classes
    expected = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (16 * 9 * 9 * 50 + 50) + (50 * 10 + 10)
    assert f"Total params: {expected:,}" in (run / "summary.txt").read_text()
    assert json.loads((run / "meta.json").read_text())["params"] == expected
    history = cnnlab.Run(run).history
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert history[1]["loss"] < history[0]["loss"]
    model, pre, classes, _ = load_model(run)                       # rebuilt later from the folder: same shapes
    assert pre.image_size == 48 and _first_dense(model).in_features == 16 * 9 * 9
    photos = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (90, 120, 3), dtype=np.uint8))
              for i in range(3)]
    top = cnnlab.load(run).predict(photos, topk=2)
    assert len(top) == 3 and all(len(t) == 2 and {c for c, _ in t} <= set(classes) for t in top)
    assert all(1 >= t[0][1] >= t[1][1] >= 0 for t in top)
