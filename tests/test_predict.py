"""Prediction on new images: every input kind decoded exactly as the data set was, files in batches, bad files reported."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnlab.inference.predict as predict_mod
from cnnlab.data.images import decode
from cnnlab.errors import CnnlabError, DataError
from cnnlab.inference.predict import Predictor, find_images, format_table, predict_files, write_predictions
from cnnlab.data.preprocess import Preprocess

CLASSES = ["cat", "dog", "owl"]
# image_size 16 -> the central 0.8 (13 px) resized to input_size 12: the eval-crop path of Preprocess runs too.
PRE = Preprocess(image_size=16, input_size=12, eval_crop=0.8, mean=[0.5, 0.45, 0.4], std=[0.25, 0.2, 0.3])


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, len(CLASSES))).eval()


def rgb(seed: int, w: int = 28, h: int = 20) -> Image.Image:
    """A non-square random RGB image, so the shorter-side resize and the centre crop both matter."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def write_all_modes(folder):
    """PNG, JPEG, grayscale, RGBA, CMYK and palette files; returns their paths in a fixed order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "rgb.png": (rgb(1), "PNG"),
        "photo.jpg": (rgb(2), "JPEG"),
        "gray.png": (rgb(3).convert("L"), "PNG"),
        "alpha.png": (rgb(4).convert("RGBA"), "PNG"),
        "cmyk.jpg": (rgb(5).convert("CMYK"), "JPEG"),
        "palette.png": (rgb(6).convert("P"), "PNG"),
    }
    paths = []
    for name, (im, fmt) in files.items():
        im.save(folder / name, fmt)
        paths.append(folder / name)
    return paths


def manual_probs(model, paths) -> torch.Tensor:
    """The reference: the data set decoder, then Preprocess, model, softmax, computed by hand."""
    arr, keep = decode(paths, PRE.image_size, skip_corrupt=False, what="test", quiet=True)
    assert keep.all()
    with torch.no_grad():
        return torch.softmax(model(PRE(torch.from_numpy(np.ascontiguousarray(arr)))), dim=1)


@pytest.fixture
def predictor():
    return Predictor(tiny_model(), PRE, CLASSES, batch_size=4)


def test_probabilities_match_manual_computation_for_every_mode(tmp_path, predictor):
    paths = write_all_modes(tmp_path / "img")
    modes = [Image.open(p).mode for p in paths]
    assert modes == ["RGB", "RGB", "L", "RGBA", "CMYK", "P"]
    probs = predictor.probabilities(paths)
    assert probs.shape == (6, 3)
    torch.testing.assert_close(probs, manual_probs(predictor.model, paths), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    # different images, different answers: the test would notice inputs being ignored
    assert not torch.allclose(probs[0], probs[1])


def test_predict_topk_sorted_and_clipped(tmp_path, predictor):
    paths = write_all_modes(tmp_path / "img")
    probs = predictor.probabilities(paths)
    top = predictor.predict(paths, topk=10)
    assert [len(t) for t in top] == [3] * 6                       # clipped to 3 classes
    for t, row in zip(top, probs):
        assert [p for _, p in t] == sorted((p for _, p in t), reverse=True)
        assert {label: p for label, p in t} == pytest.approx(dict(zip(CLASSES, row.tolist())))
    one = predictor.predict(paths[0], topk=1)                      # a single item -> a list of one
    assert one == [[top[0][0]]]
    with pytest.raises(CnnlabError, match="topk"):
        predictor.predict(paths[0], topk=0)


def test_every_input_kind_gives_identical_outputs(tmp_path, predictor):
    path = tmp_path / "rgb.png"
    rgb(7).save(path)
    hwc = np.asarray(Image.open(path))
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    inputs = [str(path), path, Image.open(path), hwc, chw, torch.from_numpy(chw),
              torch.from_numpy(chw).float() / 255.0,
              (torch.from_numpy(chw).double() - 0.3) / 255.0]    # float: rounded to the nearest uint8, clamped
    probs = predictor.probabilities(inputs)
    for i in range(1, len(inputs)):
        assert torch.equal(probs[i], probs[0]), f"input kind {i} differs"
    # a batch tensor counts as its images, in order, and can be mixed with other kinds
    other = np.asarray(rgb(8))
    batch = torch.from_numpy(np.stack([chw, other.transpose(2, 0, 1)]))
    mixed = predictor.probabilities([batch, other])
    assert mixed.shape == (3, 3)
    assert torch.equal(mixed[0], probs[0]) and torch.equal(mixed[1], mixed[2])
    # grayscale: an (H, W) array and a (1, H, W) tensor are the same image as the "L" file
    gray_path = tmp_path / "gray.png"
    rgb(9).convert("L").save(gray_path)
    g = np.array(Image.open(gray_path))
    gp = predictor.probabilities([gray_path, g, torch.from_numpy(g)[None]])
    assert torch.equal(gp[0], gp[1]) and torch.equal(gp[0], gp[2])


def test_batch_size_does_not_change_results(tmp_path):
    paths = write_all_modes(tmp_path / "img")
    a = Predictor(tiny_model(), PRE, CLASSES, batch_size=1).probabilities(paths)
    b = Predictor(tiny_model(), PRE, CLASSES, batch_size=64).probabilities(paths)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_inputs_are_cnnlab_errors(tmp_path, predictor):
    with pytest.raises(DataError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="x.jpg"):
        predictor.predict(bad)
    with pytest.raises(CnnlabError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(CnnlabError, match="shape"):
        predictor.predict(torch.zeros(5, 8, 8, dtype=torch.uint8))
    with pytest.raises(CnnlabError, match="4 class names"):
        Predictor(tiny_model(), PRE, CLASSES + ["emu"]).predict(np.zeros((8, 8, 3), dtype=np.uint8))


def make_tree(root):
    """root/a (3 images + notes.txt + hidden file), root/a/sub/deeper (2 images), root/z.png."""
    a = write_all_modes(root / "a")[:3]
    deep = root / "a" / "sub" / "deeper"
    deep.mkdir(parents=True)
    rgb(10).save(deep / "n1.png")
    rgb(11).save(deep / "n2.jpeg")
    (root / "a" / "notes.txt").write_text("not an image")
    rgb(12).save(root / "a" / ".hidden.png")
    rgb(13).save(root / "z.png")
    return a


def test_find_images_walks_folders_and_keeps_given_files(tmp_path):
    make_tree(tmp_path)
    for extra in ("alpha.png", "cmyk.jpg", "palette.png"):
        (tmp_path / "a" / extra).unlink()
    found = find_images([tmp_path / "a", tmp_path / "z.png", tmp_path / "nope.png", tmp_path / "a" / "notes.txt",
                         tmp_path / "a" / "rgb.png"])             # rgb.png again: listed once
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/gray.png", "a/photo.jpg", "a/rgb.png", "a/sub/deeper/n1.png", "a/sub/deeper/n2.jpeg",
                   "z.png", "nope.png", "a/notes.txt"]


def test_predict_files_reports_failures_and_predicts_the_rest(tmp_path, predictor):
    make_tree(tmp_path)
    (tmp_path / "a" / "x.jpg").write_bytes(b"not an image")
    rows, failures = predict_files(predictor, [tmp_path / "a", tmp_path / "missing.jpg", tmp_path / "z.png"],
                                   topk=2, batch_size=3)
    names = [r["path"].name for r in rows]
    assert names == ["alpha.png", "cmyk.jpg", "gray.png", "palette.png", "photo.jpg", "rgb.png",
                     "n1.png", "n2.jpeg", "z.png"]
    assert {p.name: reason for p, reason in failures} == {"x.jpg": "not an image Pillow can read",
                                                          "missing.jpg": "file not found"}
    assert all(len(r["top"]) == 2 for r in rows)
    # same numbers as the in-memory API
    expect = predictor.predict([r["path"] for r in rows], topk=2)
    for r, e in zip(rows, expect):
        assert [label for label, _ in r["top"]] == [label for label, _ in e]
        assert [p for _, p in r["top"]] == pytest.approx([p for _, p in e], abs=1e-6)


def test_predict_files_decodes_batch_by_batch(tmp_path, predictor, monkeypatch):
    paths = write_all_modes(tmp_path / "img") + [tmp_path / "img" / "missing.png"]
    events = []
    real_decode, real_probs = predict_mod._decode_file, predictor.probabilities_of_arrays
    monkeypatch.setattr(predict_mod, "_decode_file", lambda p, s: events.append("decode") or real_decode(p, s))
    monkeypatch.setattr(predictor, "probabilities_of_arrays",
                        lambda arrays: events.append(len(arrays)) or real_probs(arrays))
    rows, failures = predict_files(predictor, paths, topk=1, batch_size=2)
    assert len(rows) == 6 and len(failures) == 1
    # decode 2, predict 2, decode 2, ...: never all files first; the last batch (the missing file) predicts nothing
    assert events == ["decode", "decode", 2] * 3 + ["decode"]


def test_table_csv_and_json(tmp_path, predictor):
    paths = write_all_modes(tmp_path / "img")[:3]
    rows, _ = predict_files(predictor, paths, topk=3, batch_size=8)
    table = format_table(rows, topk=2)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split() == ["path", "top1", "top2"]
    col = lines[0].index("top1")
    for line, r in zip(lines[1:], rows):
        assert line.startswith(str(r["path"]))
        label, prob = r["top"][0]
        assert line[col:].startswith(f"{label} ({prob:.3f})")
        assert len(re.findall(r"\w+ \(\d\.\d{3}\)", line)) == 2

    write_predictions(rows, tmp_path / "out" / "p.csv")
    with open(tmp_path / "out" / "p.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    for b, r in zip(back, rows):
        assert b["path"] == str(r["path"])
        assert [(b[f"label_{i}"], float(b[f"prob_{i}"])) for i in (1, 2, 3)] == r["top"]

    write_predictions(rows, tmp_path / "out" / "p.JSON")
    data = json.loads((tmp_path / "out" / "p.JSON").read_text())
    assert data == [{"path": str(r["path"]), "top": [{"label": label, "prob": p} for label, p in r["top"]]}
                    for r in rows]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.JSON", "p.csv"]   # no temp files left

    with pytest.raises(CnnlabError, match=r"\.csv, \.json"):
        write_predictions(rows, tmp_path / "out" / "p.txt")
