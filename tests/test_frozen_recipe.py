"""The frozen-feature recipe (flip-averaged, standardized features, a linear head, weight decay and label
smoothing searched on the validation split, early stopping): it beats the practice's Dense(400) head where a
linear classifier is optimal, its run folder rebuilds, and its config rules hold.

The "backbone" here decodes a feature vector stored in the pixels of an 8x8 image, so the whole pipeline (data source, cached features, head training, run folder, load_model) runs on features whose
distribution the test chooses: Gaussian classes with one shared covariance, where the Bayes classifier is
linear, with few training images per class, where a 400-unit hidden layer mostly fits noise. The images are mirror-symmetric (the left half stored,
the right half its mirror), as the distribution of natural images is: the mirror view carries the same
features, and averaging the two views loses nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.api import load_model
from cnnlab.config import from_dict
from cnnlab.data import load_dataset, register_source
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.models.backbones import TransferNet

D, K, SCALE = 64, 10, 16.0          # feature dims, classes; pixel = 128 + SCALE * feature
# The backbone's feature scales span e^-2..e^2, as pooled features of a real network span orders of magnitude.
SCALES = torch.exp(torch.linspace(-2, 2, D))


@register_source("gaussian_features")
def gaussian_features(cfg, quiet: bool = False):
    """Class means N(0, 0.3^2) per dimension plus a common offset, unit noise: linear is optimal (the
    backbone scales each dimension, which keeps it so)."""
    rng = np.random.default_rng(7)
    means = rng.normal(0, 0.3, (K, D)) + rng.normal(0, 1.5, D)      # the offset: standardization removes it

    def split(n_per_class: int):
        y = np.tile(np.arange(K), n_per_class)
        f = means[y] + rng.normal(0, 1, (len(y), D))
        x = np.zeros((len(y), 3, 8, 8), np.uint8)
        x[:, :2, :, :4] = np.clip(np.round(128 + SCALE * f), 0, 255).reshape(-1, 2, 8, 4)
        x[:, :2, :, 4:] = x[:, :2, :, 3::-1]
        return x, y.astype(np.int64)

    xtr, ytr = split(30)                # 24 a class after the validation split
    xte, yte = split(200)
    return xtr, ytr, xte, yte, [f"c{k}" for k in range(K)]


class PixelFeatures(nn.Module):
    """images -> the feature vector stored in the left half of channels 0-1, times SCALES (inputs are x/255:
    mean 0, std 1 declared)."""
    pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "input_size": (3, 8, 8)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :2, :, :4].flatten(1) * 255 - 128) / SCALE * SCALES.to(x.device)


def pixel_features() -> nn.Module:
    return PixelFeatures()


DATA = {"source": "gaussian_features", "classes": 0, "val_fraction": 0.2}
PRACTICE = {"data": DATA, "model": {"name": "test_frozen_recipe:pixel_features", "head": [400]},
            "train": {"optimizer": "adam", "lr": 0.001, "epochs": 40, "batch_size": 32, "freeze_backbone": True,
                      "precision": "fp32"}}
RECIPE = {"data": DATA,
          "model": {"name": "test_frozen_recipe:pixel_features", "head": [], "flip_average": True,
                    "standardize_features": True},
          "train": {"optimizer": "adam", "lr": 0.001, "epochs": 40, "batch_size": 32, "freeze_backbone": True,
                    "precision": "fp32"},
          "search": {"weight_decay": [0.01, 0.3], "label_smoothing": [0.0, 0.1]},
          "early_stopping": {"enabled": True, "monitor": "val_accuracy", "patience": 6,
                             "restore_best_weights": True}}


C_GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
# [search] C: the same features, the linear head solved as a logistic regression with C chosen by 5-fold CV
LOGISTIC = {"data": DATA, "model": RECIPE["model"], "train": RECIPE["train"], "search": {"C": C_GRID}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both heads on the same data and seed, without the figures (seconds of matplotlib a run, tested
    elsewhere). A module fixture runs before conftest's isolation: it points the feature cache away itself."""
    tmp = tmp_path_factory.mktemp("recipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_CACHE", str(tmp / "cache"))
        mp.setattr("cnnlab.records.evaluation.write_evaluation", lambda *a, **k: None)
        mp.setattr("cnnlab.experiments.run.plot_curves", lambda *a, **k: None)
        return {name: run_experiment(from_dict({"name": name, **raw}), tmp / "runs", progress="none")
                for name, raw in (("practice", PRACTICE), ("recipe", RECIPE), ("logistic", LOGISTIC))}


def test_recipe_beats_the_dense400_head_where_linear_is_optimal(runs):
    practice, recipe = runs["practice"].results, runs["recipe"].results
    # Seeds 0-2 measured: practice 0.44 / 0.42 / 0.44, recipe 0.53 / 0.55 / 0.59 (Bayes-optimal: ~0.75).
    assert recipe.test_accuracy > practice.test_accuracy + 0.05, (recipe.test_accuracy, practice.test_accuracy)
    found = recipe.extra
    assert len(found["search"]) == 4 and set(found["chosen"]) == {"weight_decay", "label_smoothing"}
    best = max(found["search"], key=lambda t: (t["val_accuracy"], -t["val_loss"]))
    assert found["chosen"] == {k: best[k] for k in ("weight_decay", "label_smoothing")}
    assert recipe.restored_best_weights or recipe.epochs_run == RECIPE["train"]["epochs"]
    # The run trained with the chosen values, and its config.toml says so (a rerun of the folder searches again).
    _, _, _, cfg = load_model(runs["recipe"].path, trust_code=True)     # its module:function backbone
    assert cfg.train.weight_decay == found["chosen"]["weight_decay"]
    assert cfg.train.label_smoothing == found["chosen"]["label_smoothing"]


def test_rebuilt_model_reproduces_the_test_accuracy(runs):
    out = runs["recipe"]
    model, pre, _, _ = load_model(out.path, trust_code=True)
    assert model.flip_average and hasattr(model.head, "standardize")
    ratio = model.head.standardize.std / SCALES                    # the training split's, not identity
    assert 0.8 < ratio.min() and ratio.max() < 1.3
    ds = load_dataset(from_dict({"data": DATA}).data)
    with torch.no_grad():
        correct = (model(pre(ds.x_test)).argmax(1) == ds.y_test).sum().item()
    assert correct / len(ds.y_test) == out.results.test_accuracy


def test_flip_averaged_features_are_the_mean_of_both_views(tmp_path):
    from cnnlab.transfer.features import cached_features, extract
    from cnnlab.data.preprocess import Preprocess
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = torch.zeros(6, dtype=torch.long)
    args = (Preprocess(8, 8), torch.device("cpu"), False)
    plain, mirror = (extract(PixelFeatures(), x, *args, quiet=True, mirror=m) for m in (False, True))
    assert torch.equal(mirror, PixelFeatures()(x.flip(-1).float() / 255))
    both, hit = cached_features(PixelFeatures(), {"b": "pixels"}, x, y, *args, split="t", quiet=True,
                                flip_average=True)
    assert not hit and torch.equal(both, (plain + mirror) / 2)
    again, hit = cached_features(PixelFeatures(), {"b": "pixels"}, x, y, *args, split="t", quiet=True,
                                 flip_average=True)
    assert hit and torch.equal(again, both)
    # The model's forward averages the same two views, so the rebuilt model sees what the head was trained on.
    net = TransferNet(PixelFeatures(), D, K, [], flip_average=True)
    net.head = nn.Identity()
    assert torch.equal(net(x.float() / 255), both)


def test_standardize_layer_keeps_the_dense_layers_checkpoint_keys():
    plain = TransferNet(PixelFeatures(), D, K, [16]).head.state_dict()
    std = TransferNet(PixelFeatures(), D, K, [16], standardize=True).head.state_dict()
    assert set(std) == set(plain) | {"standardize.mean", "standardize.std"}


@pytest.mark.parametrize("raw, match", [
    ({"model": {"name": "resnet18", "standardize_features": True}}, "standardize_features needs .*freeze_backbone"),
    ({"model": {"name": "resnet18", "flip_average": True}}, "flip_average needs .*freeze_backbone"),
    ({"search": {"weight_decay": [0.01, 0.1]}}, r"\[search\] needs .*freeze_backbone"),
    ({"train": {"freeze_backbone": True}, "search": {"lr": [0.1]}, "data": {"val_fraction": 0.0}},
     "validation split"),
    ({"train": {"freeze_backbone": True}, "search": {"label_smoothing": [1.0]}}, "label_smoothing"),
])
def test_recipe_keys_need_a_frozen_backbone_and_a_validation_split(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_keeps_the_mirror_view_and_the_statistics(runs, fmt):
    """The exported file holds what the rebuilt model does (both views, the standardization buffers);
    export_run checks it against PyTorch on the run's own test images."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from cnnlab.api import export_run
    path, diff = export_run(runs["recipe"].path, fmt, trust_code=True)
    assert path.is_file() and diff < 1e-4


def _features(out, images: torch.Tensor) -> torch.Tensor:
    """The rebuilt model's features of `images` as its Linear layer sees them (both views, standardized)."""
    model, pre, _, _ = load_model(out.path, trust_code=True)
    linear = model.head[-1]
    model.head = nn.Sequential(model.head.standardize)
    with torch.no_grad():
        return model(pre(images)), linear


def test_logistic_head_is_the_cross_validated_logistic_regression_on_every_training_image(runs):
    """The yardstick of benchmarks/transfer/linear_baseline.py, computed here independently with scikit-learn
    (GridSearchCV over the same C grid and seeded folds, refitted on all training images): the run's head is
    that model, so it scores what it scores, and beats the grid recipe trained with Adam on a 20% hold-out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    out = runs["logistic"]
    ds = load_dataset(from_dict({"data": DATA}).data)
    z_train, linear = _features(out, ds.x_train)
    z_test, _ = _features(out, ds.x_test)
    search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": C_GRID}, scoring="accuracy",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0)).fit(z_train.double().numpy(), ds.y_train)
    found = out.results.extra["logistic"]
    assert found["C"] == search.best_params_["C"] and found["images"] == len(ds.y_train) == 300
    assert found["cv_accuracy"] == pytest.approx(search.best_score_, abs=1 / 300)
    theirs = search.predict(z_test.double().numpy())
    ours = linear(z_test).argmax(1).numpy()
    assert (ours == theirs).mean() >= 0.99                         # the same model, up to the solver's tolerance
    assert out.results.test_accuracy >= (theirs == ds.y_test.numpy()).mean() - 0.005
    assert out.results.test_accuracy > runs["recipe"].results.test_accuracy       # measured 0.618 vs 0.532
    assert out.results.test_accuracy > runs["practice"].results.test_accuracy + 0.1


def test_a_solved_head_is_a_whole_run_folder(runs):
    out = runs["logistic"]
    assert out.results.epochs_run == 0 and out.results.status == "ok" and out.history == []
    assert out.results.val_accuracy == out.results.extra["logistic"]["cv_accuracy"]   # its validation is the CV
    assert (out.path / "checkpoints" / "last.pt").is_file()
    ev, _ = __import__("cnnlab").load(out.path, trust_code=True).evaluate()
    assert ev.top1 == out.results.test_accuracy


@pytest.mark.parametrize("raw, match", [
    ({"search": {"C": [0.1], "weight_decay": [0.1]}}, r"'C' .*cannot be combined"),
    ({"model": {"head": [400]}, "search": {"C": [0.1]}}, r"\[search\] C fits a linear head"),
    ({"search": {"C": [0.0]}}, r"'C' values must be > 0"),
    ({"search": {"C": [1.0], "cv_folds": 1}}, r"'cv_folds' must be at least 2"),
])
def test_logistic_head_keys_are_checked(raw, match):
    base = {"train": {"freeze_backbone": True}, "model": {"name": "resnet18", "head": []}}
    merged = {k: {**base.get(k, {}), **raw.get(k, {})} for k in set(base) | set(raw)}
    with pytest.raises(ConfigError, match=match):
        from_dict(merged)
