"""Grad-CAM explanations: the heatmap falls on what decides the class, files and errors.png get them, bad layers say so."""
from __future__ import annotations

import csv
import io
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import cli

QUADRANTS = 4
GOOD = 6          # per test class: the square in the class's own quadrant; the next 2 in the next quadrant


def quadrant_of(k: int) -> tuple[int, int]:
    return (k // 2) * 16, (k % 2) * 16


def write_quadrant_images(root, n_train: int = 40, n_test: int = GOOD + 2) -> None:
    """Class qK: noise with a bright 8x8 square somewhere in quadrant K of a 32x32 image. The test split's
    last two images of each class have their square in the next quadrant: errors the net is sure of."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(QUADRANTS):
            d = root / split / f"q{k}"
            d.mkdir(parents=True)
            for i in range(n):
                where = k if (split == "train" or i < GOOD) else (k + 1) % QUADRANTS
                im = rng.integers(0, 110, (32, 32, 3)).astype(np.uint8)
                r, c = (v + int(rng.integers(2, 7)) for v in quadrant_of(where))
                im[r:r + 8, c:c + 8] = 250
                Image.fromarray(im).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One BaseNet run on the quadrant images, with what its errors.png was drawn from."""
    import cnnlab.records.evaluation as evaluation
    tmp = tmp_path_factory.mktemp("explain")
    write_quadrant_images(tmp / "imgs")
    (tmp / "q.toml").write_text(textwrap.dedent(f"""
        name = "quad"
        seed = 0
        [data]
        source = "imagefolder"
        data_dir = "{tmp / 'imgs'}"
        classes = 0
        [model]
        name = "basenet"
        [train]
        optimizer = "adam"
        lr = 0.003
        epochs = 5
        batch_size = 16
        precision = "fp32"
    """))
    drawn, real = {}, evaluation.plot_errors

    def spy(errors, images, title="", heatmaps=None):
        drawn.update(errors=errors, heatmaps=heatmaps, images=images)
        return real(errors, images, title, heatmaps)

    with pytest.MonkeyPatch.context() as mp:           # the per-test isolated_env is not there yet
        for var, sub in (("CNNLAB_CACHE", "cache"), ("CNNLAB_DATA", "data"), ("MPLCONFIGDIR", "mpl")):
            mp.setenv(var, str(tmp / sub))
        mp.setattr(evaluation, "plot_errors", spy)
        proc = cli(["run", tmp / "q.toml", "--runs-dir", tmp / "runs", "-q"], tmp / "home")
    assert proc.returncode == 0, proc.stderr
    run = next((tmp / "runs").glob("quad-*"))
    return {"run": run, "imgs": tmp / "imgs", "drawn": drawn, "tmp": tmp}


def good_test_images(imgs) -> list:
    return [imgs / "test" / f"q{k}" / f"{i}.png" for k in range(QUADRANTS) for i in range(GOOD)]


def quadrant_mass(heatmap: np.ndarray) -> np.ndarray:
    return np.array([heatmap[r:r + 16, c:c + 16].sum() for r, c in map(quadrant_of, range(QUADRANTS))])


def test_heatmap_falls_on_the_square_and_api_values(trained):
    import cnnlab
    model = cnnlab.load(trained["run"], device="cpu")
    files = good_test_images(trained["imgs"])
    found = model.explain(files)
    assert len(found) == len(files)
    predicted = model.predict(files, topk=3)
    right, share = 0, []
    for f, e, p in zip(files, found, predicted):
        k = int(f.parent.name[1])
        assert e.heatmap.shape == (32, 32) and e.heatmap.dtype == np.float32
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0 + 1e-6 and e.heatmap.max() > 0.99
        assert e.image.dtype == np.uint8 and np.array_equal(e.image, np.asarray(Image.open(f)))   # what it saw
        assert [label for label, _ in e.top] == [label for label, _ in p] and e.target == e.top[0][0]
        assert np.allclose([v for _, v in e.top], [v for _, v in p], atol=1e-6) and e.layer == "5"
        mass = quadrant_mass(e.heatmap)
        right += int(mass.argmax() == k)
        share.append(mass[k] / mass.sum())
    # chance is 1 in 4 quadrants and a quarter of the mass; the square decides the class, and the map says so
    assert right >= 0.9 * len(files) and np.mean(share) > 0.5, (right, np.mean(share))
    # a uint8 array (H, W, 3) is explained as the file it came from
    again = model.explain(np.asarray(Image.open(files[0])), topk=2)[0]
    assert len(again.top) == 2 and np.allclose(again.heatmap, found[0].heatmap, atol=1e-5)


def test_errors_png_gets_the_heatmaps_of_the_confident_errors(trained):
    drawn = trained["drawn"]
    errors, heatmaps = drawn["errors"], drawn["heatmaps"]
    # the 8 test images whose square sits in the next quadrant are the errors, predicted as that quadrant
    assert len(errors) == 2 * QUADRANTS
    assert all(e["pred"] == f"q{(int(e['true'][1]) + 1) % QUADRANTS}" for e in errors)
    assert heatmaps is not None and len(heatmaps) == len(errors)
    for e, h in zip(errors, heatmaps):
        plain = drawn["images"][e["index"]].permute(1, 2, 0).numpy()
        assert h.shape == (32, 32, 3) and h.dtype == np.uint8 and not np.array_equal(h, plain)
    results = json.loads((trained["run"] / "results.json").read_text())
    assert not any("Grad-CAM" in w for w in results["warnings"])
    assert (trained["run"] / "errors.png").stat().st_size > 0


def test_plot_errors_draws_each_heatmap_beside_its_image():
    from cnnlab.records.evaluation import plot_errors
    images = torch.full((3, 3, 16, 16), 128, dtype=torch.uint8)
    errors = [{"index": i, "true": "a", "pred": "b", "prob": 0.9} for i in range(3)]
    green = [np.tile(np.array([0, 255, 0], np.uint8), (16, 16, 1))] * 3

    def green_pixels(fig) -> int:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        a = np.asarray(Image.open(buf).convert("RGB")).astype(int)
        return int(((a[..., 1] > 200) & (a[..., 0] < 60) & (a[..., 2] < 60)).sum())
    assert green_pixels(plot_errors(errors, images, heatmaps=None)) == 0
    assert green_pixels(plot_errors(errors, images, heatmaps=green)) > 3 * 500


def test_explain_cli_writes_a_figure_per_image_and_tables(trained):
    run, imgs = trained["run"], trained["imgs"]
    proc = cli(["explain", run, imgs / "test" / "q0", imgs / "test" / "q2" / "0.png", "--topk", "2"],
               trained["tmp"] / "home")
    assert proc.returncode == 0, proc.stderr
    out = run / "explain"
    n = GOOD + 2 + 1
    lines = [line for line in proc.stdout.splitlines() if line.startswith(str(imgs))]
    assert len(lines) == n and "Grad-CAM at layer 5 (ReLU)" in proc.stdout
    # q0/0.png and q2/0.png share a stem: each figure is named after its folder, none replaces the other
    assert (out / "q0-0.png").is_file() and (out / "q2-0.png").is_file() and (out / "q0-1.png").is_file() is False
    assert (out / "1.png").is_file() and Image.open(out / "q2-0.png").size[0] > 100
    with open(out / "explain.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2"]
    assert rows[-1]["label_1"] == "q2" and float(rows[-1]["prob_1"]) > 0.5
    meta = json.loads((out / "explain.json").read_text())
    assert meta["layer"] == "5" and [i["figure"] for i in meta["images"]][-1] == "q2-0.png"
    assert all(i["explained"] == i["top"][0]["label"] for i in meta["images"])


def test_layer_option_and_bad_layers_exit_2(trained, tmp_path):
    run, img = trained["run"], trained["imgs"] / "test" / "q1" / "0.png"
    proc = cli(["explain", run, img, "--layer", "3", "--out", tmp_path / "x"], tmp_path / "home")   # the 2nd conv
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "x" / "explain.json").read_text())["layer"] == "3"
    assert (tmp_path / "x" / "0.png").is_file()
    for layer, says in (("nope", "no such module"), ("7", "no (N, C, H, W) feature map")):
        proc = cli(["explain", run, img, "--layer", layer, "--out", tmp_path / "y"], tmp_path / "home")
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cnnlab: error: --layer '{layer}'") and says in err[0]
        assert "'5'" in err[0]                  # it names the layers that work
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())


def test_default_layer_of_backbones_and_a_flip_averaged_frozen_net():
    from cnnlab.config import ModelConfig
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.inference.explain import find_layer, grad_cam
    from cnnlab.models.build import build_model
    torch.manual_seed(0)
    tv, _, _ = build_model(ModelConfig(name="tv:resnet18", weights="none"), 3, 64)
    assert find_layer(tv, Preprocess(64, 64))[0] == "backbone.layer4"          # 2x2 at 64 px
    assert find_layer(tv, Preprocess(32, 32))[0] == "backbone.layer3"          # layer4 is 1x1 there: no map
    convnext, _, _ = build_model(ModelConfig(name="convnext_nano", weights="none"), 3, 64)
    assert find_layer(convnext, Preprocess(64, 64))[0] == "backbone.stages"     # not the Identity after it
    net, _, _ = build_model(ModelConfig(name="test_resnet", weights="none", flip_average=True), 3, 32)
    net.set_backbone_trainable(False)
    pre = Preprocess(32, 32)
    name, layer = find_layer(net, pre)
    assert name == "backbone.layer3"
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = grad_cam(net, pre, torch.cat([x, x.flip(-1)]), [1, 2, 1, 2], layer)
    assert maps.shape == (4, 32, 32)
    # the model sees an image and its mirror alike, so the map of the mirror is the mirrored map
    np.testing.assert_allclose(maps[2:], maps[:2, :, ::-1], atol=1e-4)
    assert not any(p.requires_grad for p in net.backbone.parameters())          # still frozen afterwards
    assert all(p.grad is None for p in net.parameters())


def test_eval_mode_and_no_map_without_a_spatial_layer():
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.errors import CnnlabError
    from cnnlab.inference.explain import error_overlays, find_layer, grad_cam
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).train()
    before = net[1].running_mean.clone()
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    name, layer = find_layer(net, Preprocess(8, 8))
    assert name == "2"
    grad_cam(net, Preprocess(8, 8), x, [0, 1, 0], layer)
    assert net.training and torch.equal(net[1].running_mean, before)      # eval mode inside, restored after
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(CnnlabError, match="no layer with a spatial feature map"):
        find_layer(mlp, Preprocess(8, 8))
    heatmaps, note = error_overlays(mlp, Preprocess(8, 8), x, [{"index": 0, "pred": "b"}], ["a", "b"])
    assert heatmaps is None and note.startswith("errors.png: no Grad-CAM heatmaps")


def test_default_layer_of_a_layer_list_net_is_its_last_feature_map():
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.inference.explain import find_layer, grad_cam
    from cnnlab.models.layers import build_layers
    torch.manual_seed(0)
    net = build_layers(["Conv2D(4, 3, activation='relu')", "MaxPooling2D(2)", "Conv2D(8, 3, padding='same')",
                        "Activation('relu')", "Flatten()", "Dense(2)"], 2, 16)
    name, layer = find_layer(net, Preprocess(16, 16))
    assert name == "3" and layer is dict(net.named_modules())["3"]               # the relu after the 2nd conv
    maps = grad_cam(net, Preprocess(16, 16), torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), [0, 1], layer)
    assert maps.shape == (2, 16, 16) and maps.max() <= 1.0 + 1e-6
