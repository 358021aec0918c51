"""Use what you trained: every model kind rebuilds from its run folder alone (classes.json, preprocess.json,
checkpoints), and `cnnlab evaluate / predict / export` work on it, with one clear error per bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab.api import load_model
from cnnlab.config import from_dict
from cnnlab.data import load_dataset
from cnnlab.experiments.run import run_experiment

from conftest import cli

SYN = {"source": "synthetic", "classes": 4, "synthetic_train": 160, "synthetic_test": 40}
TRAIN = {"optimizer": "adam", "epochs": 2, "batch_size": 32, "precision": "fp32"}

KINDS = {
    "registered": {"data": SYN, "model": {"name": "basenet"}, "train": {**TRAIN, "normalize": "featurewise"}},
    "timm": {"data": {**SYN, "image_size": 40}, "model": {"name": "test_resnet", "weights": "none", "head": [8],
                                                          "input_size": 32}, "train": TRAIN},
    "torchvision": {"data": SYN, "model": {"name": "tv:resnet18", "weights": "none", "input_size": 32},
                    "train": {**TRAIN, "epochs": 1}},
    "custom": {"data": SYN, "model": {"name": "test_transfer:tiny_backbone", "weights": "none", "input_size": 40},
               "train": TRAIN},
    "members": {"data": SYN, "model": {"name": "airnet", "args": {"widths": [8, 8], "members": 2}}, "train": TRAIN},
    "frozen": {"data": {**SYN, "image_size": 40}, "model": {"name": "test_resnet", "weights": "none", "head": [8],
                                                            "input_size": 32},
               "train": {**TRAIN, "freeze_backbone": True, "epochs": 3}},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_rebuilds_from_its_run_folder(tmp_path, kind):
    cfg = from_dict({"name": kind, **KINDS[kind]})
    out = run_experiment(cfg, tmp_path / "runs", progress="none")
    run = out.path
    ds = load_dataset(cfg.data)
    assert json.loads((run / "classes.json").read_text()) == ds.classes
    pre = json.loads((run / "preprocess.json").read_text())
    assert pre["image_size"] == ds.x_train.shape[-1]
    assert pre["input_size"] == {"timm": 32, "frozen": 32, "torchvision": 32, "custom": 40}.get(kind, ds.x_train.shape[-1])
    if kind == "registered":                               # featurewise statistics of the training split
        assert pre["mean"] is not None and 0 < pre["mean"][0] < 1
    elif kind in ("timm", "frozen"):                        # test_resnet's own pretrained_cfg: 0.5 / 0.5
        assert pre["mean"] == pytest.approx([0.5] * 3) and pre["std"] == pytest.approx([0.5] * 3)
    elif kind in ("torchvision", "custom"):
        assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    if kind == "frozen":
        assert (run / "checkpoints" / "backbone.pt").is_file()
    # The rebuilt model scores the test split exactly as the run did (frozen runs: backbone + head on images).
    model, preprocess, classes, _ = load_model(run, trust_code=kind == "custom")   # module:function: code
    with torch.no_grad():
        pred = model(preprocess(ds.x_test)).argmax(1)
    acc = (pred == ds.y_test).float().mean().item()
    assert acc == pytest.approx(out.results.test_accuracy, abs=1e-6 if kind != "frozen" else 0.03)
    assert classes == ds.classes


def _small_run(runs_dir: Path, name: str, seed: int = 0) -> Path:
    """A small BaseNet run (4 classes, 32x32), 3 epochs."""
    cfg = from_dict({"name": name, "seed": seed, "data": SYN, "model": {"name": "basenet"},
                     "train": {**TRAIN, "epochs": 3, "normalize": "featurewise"}})
    return run_experiment(cfg, runs_dir, progress="none").path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small run shared by the command tests below."""
    return _small_run(tmp_path_factory.mktemp("use") / "runs", "use")


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for name, mode in (("a.png", "RGB"), ("b.jpg", "RGB"), ("c.png", "L"), ("d.png", "RGBA")):
        shape = (45, 60) if mode == "L" else (45, 60, len(mode))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name)
        files.append(folder / name)
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "sub" / "e.png")
    return files


def test_predict_cli_matches_the_python_api_and_reports_bad_files(trained, tmp_path):
    files = _images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred.json"
    proc = cli(["predict", trained, tmp_path / "imgs", "--topk", "3", "--out", out], tmp_path / "home")
    assert proc.returncode == 1, proc.stdout + proc.stderr               # one file failed...
    assert "broken.jpg" in proc.stderr and proc.stderr.count("\n") == 1
    rows = json.loads(out.read_text())                                    # ...the others were predicted
    assert len(rows) == 5 and all(len(r["top"]) == 3 for r in rows)
    assert "a.png" in proc.stdout and "e.png" in proc.stdout
    api = cnnlab.load(trained).predict([Path(r["path"]) for r in rows], topk=3)
    for r, top in zip(rows, api):
        assert [t["label"] for t in r["top"]] == [label for label, _ in top]
        assert [t["prob"] for t in r["top"]] == pytest.approx([p for _, p in top], abs=1e-6)
    ok = cli(["predict", trained, files[0], "--topk", "2"], tmp_path / "home")
    assert ok.returncode == 0, ok.stderr


def test_evaluate_cli_rescores_and_writes_its_folder(trained, tmp_path):
    proc = cli(["evaluate", trained], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    folder = trained / "eval-test"
    ev = json.loads((folder / "evaluation.json").read_text())
    res = json.loads((trained / "results.json").read_text())
    ds = load_dataset(from_dict({"data": SYN}).data)
    assert ev["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-9) and ev["n"] == len(ds.y_test) == 16
    for name in ("per_class.csv", "confusion.png", "errors.png", "confused_pairs.csv"):
        assert (folder / name).is_file(), name
    val = cli(["evaluate", trained, "--split", "val", "--weights", "best"], tmp_path / "home")
    assert val.returncode == 0, val.stderr
    from cnnlab.data import split_train_val
    _, va = split_train_val(ds.y_train, 0.1, "stratified", 0)
    assert json.loads((trained / "eval-val" / "evaluation.json").read_text())["n"] == len(va) > 0


def test_evaluate_several_runs_scores_the_mean_of_their_probabilities(trained, tmp_path):
    """`cnnlab evaluate RUN1 RUN2`: an ensemble; its loss is that of the averaged probabilities."""
    second = _small_run(tmp_path / "runs", "use2", seed=1)
    proc = cli(["evaluate", trained, second], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of 2 runs" in proc.stdout and str(second) in proc.stdout
    ev = json.loads((trained / "eval-ensemble2-test" / "evaluation.json").read_text())
    ds = load_dataset(from_dict({"data": SYN}).data)
    probs = []
    for run in (trained, second):                   # by hand: each rebuilt model's probabilities
        model, pre, _, _ = load_model(run)
        with torch.no_grad():
            probs.append(model(pre(ds.x_test)).softmax(1))
    mean = (probs[0] + probs[1]) / 2
    assert ev["n"] == len(ds.y_test)
    assert ev["accuracy"] == pytest.approx((mean.argmax(1) == ds.y_test).float().mean().item())
    assert ev["loss"] == pytest.approx(torch.nn.functional.nll_loss(mean.log(), ds.y_test).item(), rel=1e-5)
    own = {r["run"]: r["accuracy"] for r in ev["runs"]}
    for run in (trained, second):
        assert own[str(run)] == pytest.approx(json.loads((run / "results.json").read_text())["test_accuracy"])
    # Runs of other seeds hold out other validation images: refused, with the way out.
    val = cli(["evaluate", trained, second, "--split", "val"], tmp_path / "home")
    assert val.returncode == 2 and "--split val" in val.stderr and "--split test" in val.stderr


def test_evaluate_on_data_with_other_classes_names_the_difference(trained, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text('[data]\nsource = "synthetic"\nclasses = [0, 1, 2, 5]\nsynthetic_train = 160\nsynthetic_test = 40\n')
    proc = cli(["evaluate", trained, "--data", other], tmp_path / "home")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "only in the model: class_03" in line and "only in the data: class_05" in line


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_cli_round_trips(trained, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    proc = cli(["export", trained, "--format", fmt, "--out", out], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max |difference|" in proc.stdout
    diff = float(proc.stdout.split("PyTorch on real inputs: ")[1].split()[0])
    assert diff <= 1e-4
    assert json.loads((tmp_path / "labels.json").read_text()) == json.loads((trained / "classes.json").read_text())


def test_load_of_a_folder_that_is_not_a_run(tmp_path):
    proc = cli(["predict", tmp_path, tmp_path], tmp_path / "home")
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_test_flip_scores_the_mean_of_each_image_and_its_mirror_and_leaves_training_alone(tmp_path):
    base = {"data": SYN, "model": {"name": "basenet"}, "train": {**TRAIN, "normalize": "featurewise"}}
    plain = run_experiment(from_dict({"name": "plain", **base}), tmp_path / "runs", progress="none")
    flip = run_experiment(from_dict({"name": "flip", **base, "augment": {"test_flip": True}}), tmp_path / "runs",
                          progress="none")
    h0, h1 = (json.loads((o.path / "history.json").read_text()) for o in (plain, flip))
    assert [(h["loss"], h["accuracy"]) for h in h0] == [(h["loss"], h["accuracy"]) for h in h1]   # same training
    ds = load_dataset(from_dict(base).data)
    bare, pre, _, _ = load_model(plain.path)
    with torch.no_grad():
        x = pre(ds.x_test)
        mean = (bare(x) + bare(x.flip(-1))) / 2
        model, _, _, _ = load_model(flip.path)              # the rebuilt model averages both views as well
        assert torch.equal(model(x), model(x.flip(-1)))     # exactly mirror-invariant
        torch.testing.assert_close(model(x), mean)
    acc = (mean.argmax(1) == ds.y_test).float().mean().item()
    assert flip.results.test_accuracy == pytest.approx(acc, abs=1e-6)
    with torch.no_grad():
        assert not torch.allclose(mean, bare(x), atol=1e-3)     # the mirror changed the scores: not a no-op


def test_test_flip_on_a_frozen_backbone_points_to_flip_average():
    with pytest.raises(cnnlab.errors.ConfigError, match="flip_average"):
        from_dict({"name": "f", **KINDS["frozen"], "augment": {"test_flip": True}})


def _reflect_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """The image moved by s pixels down and right (s > 0) or up and left, borders mirrored: by index, not
    by padding, as an independent check of TestTimeAverage's views."""
    n = x.shape[-1]
    idx = torch.tensor([abs(i - s) if i - s < n else 2 * (n - 1) - (i - s) for i in range(n)])
    return x[..., idx, :][..., idx]


def test_test_shift_also_averages_the_diagonally_shifted_views(tmp_path):
    base = {"data": SYN, "model": {"name": "basenet"}, "train": {**TRAIN, "normalize": "featurewise"}}
    run = run_experiment(from_dict({"name": "tta", **base, "augment": {"test_flip": True, "test_shift": 1}}),
                         tmp_path / "runs", progress="none")
    ds = load_dataset(from_dict(base).data)
    model, pre, _, _ = load_model(run.path)
    bare = model.net
    with torch.no_grad():
        x = pre(ds.x_test)
        views = [x, _reflect_shift(x, 1), _reflect_shift(x, -1)]
        mean = sum(bare(v) + bare(v.flip(-1)) for v in views) / 6
        torch.testing.assert_close(model(x), mean)
        flip_only = (bare(x) + bare(x.flip(-1))) / 2
        assert not torch.allclose(mean, flip_only, atol=1e-4)       # the shifted views changed the scores
    acc = (mean.argmax(1) == ds.y_test).float().mean().item()
    assert run.results.test_accuracy == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("augment, data, match", [
    ({"test_shift": -1}, SYN, "test_shift"),
    ({"test_shift": 40}, SYN, "test_shift"),
])
def test_bad_test_shift_is_refused(augment, data, match):
    with pytest.raises(cnnlab.errors.ConfigError, match=match):
        from_dict({"name": "s", "data": data, "augment": augment})


def test_test_shift_larger_than_the_images_and_on_frozen_backbones_is_refused(tmp_path):
    with pytest.raises(cnnlab.errors.ConfigError, match="test_shift"):
        from_dict({"name": "f", **KINDS["frozen"], "augment": {"test_shift": 1}})
    small = {**SYN, "image_size": 8}
    with pytest.raises(cnnlab.errors.ConfigError, match="test_shift = 8 is not smaller than the 8px"):
        run_experiment(from_dict({"name": "s", "data": small, "model": {"name": "resnet9s", "args": {"width": 4}},
                                  "train": TRAIN, "augment": {"test_shift": 8}}), tmp_path / "runs", progress="none")


def test_airnet_stem_is_whitened_from_the_training_split_and_stays_frozen(tmp_path):
    from cnnlab.data import split_train_val
    from cnnlab.models.cifar import PatchWhitening
    cfg = from_dict({"name": "air", "data": SYN, "model": {"name": "airnet", "args": {"widths": [8, 16]}},
                     "train": {**TRAIN, "optimizer": "sgd", "lr": 0.05, "normalize": "featurewise"}})
    run = run_experiment(cfg, tmp_path / "runs", progress="none")
    model, pre, _, _ = load_model(run.path)
    ds = load_dataset(cfg.data)
    tr, _ = split_train_val(ds.y_train, cfg.data.val_fraction, cfg.data.val_split, cfg.seed)
    ref = PatchWhitening(3)
    ref.init_from_data(pre(ds.x_train[tr]))                     # the whole split: fewer than 5,000 images
    torch.testing.assert_close(model[0].weight, ref.weight)     # set from the data, unchanged by training
    assert not torch.allclose(model[0].bias, torch.zeros_like(model[0].bias))   # the bias did train


def test_layers_set_from_data_see_images_spread_over_the_whole_split():
    """An image folder's records are sorted by class: the first images would all be of the first classes."""
    from torch import nn
    from cnnlab.data.stream import Batches
    from cnnlab.experiments.run import init_layers_from_data
    from cnnlab.data.preprocess import Preprocess
    seen = []

    class Probe(nn.Module):
        def init_from_data(self, x):
            seen.append(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Probe())
    x = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous()
    init_layers_from_data(model, Batches(x, torch.zeros(12, dtype=torch.long)), Preprocess(0, 0), n=4)
    assert (seen[0][:, 0, 0, 0] * 255).round().tolist() == [0, 3, 6, 9]
    init_layers_from_data(nn.Sequential(nn.Conv2d(3, 3, 1)), Batches(x, torch.zeros(12, dtype=torch.long)), Preprocess(0, 0))
    assert len(seen) == 1                                       # a model without such layers: nothing read
