"""Your images as you have them (issue 25.2, 28.3): train/+test/, train/+val/(+test/), one folder split by
fraction, a CSV or TSV of path,label rows; class names with spaces and accents; one clear line for each thing
that cannot be used; and the defaults that suit photos (all classes, mixed sizes at 256x256, a stratified
validation split even under a practice config)."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset, train_val_split
from cnnlab.errors import DataError

from conftest import cli


def _img(path: Path, value: int, size=(8, 8), fmt=None) -> None:
    """An image whose pixel (0, 0) red value is `value`: which file a row came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    arr[..., 0] = value
    Image.fromarray(arr).save(path, format=fmt)


def _tree(root: Path, counts: dict[str, int], start: int = 0) -> dict[str, list[int]]:
    """root/<class>/<nn>.png, counts[class] files each; returns class -> the values written."""
    values, v = {}, start
    for name, n in counts.items():
        values[name] = []
        for i in range(n):
            _img(root / name / f"{i:02d}.png", v)
            values[name].append(v)
            v += 1
    return values


def load(root, **kw):
    return load_dataset(DataConfig(source="imagefolder", data_dir=str(root), classes=0, **kw), quiet=True)


def red(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].tolist()


# ---------------------------------------------------------------- the four layouts

def test_train_and_test_folders(tmp_path):
    tr = _tree(tmp_path / "train", {"ant": 3, "bee": 2})
    te = _tree(tmp_path / "test", {"ant": 1, "bee": 2}, start=100)
    ds = load(tmp_path)
    assert ds.classes == ["ant", "bee"] and ds.val_rows is None
    assert red(ds.x_train) == tr["ant"] + tr["bee"] and ds.y_train.tolist() == [0, 0, 0, 1, 1]
    assert red(ds.x_test) == te["ant"] + te["bee"] and ds.y_test.tolist() == [0, 1, 1]
    assert not any("val/" in n for n in ds.notes)


def test_train_and_val_folders_val_is_validation_and_test_with_one_line(tmp_path):
    tr = _tree(tmp_path / "train", {"ant": 4, "bee": 4})
    va = _tree(tmp_path / "val", {"ant": 2, "bee": 1}, start=100)
    ds = load(tmp_path)
    # train/ then val/ in one store; val_rows name the val/ images, which are the validation split
    assert red(ds.x_train) == tr["ant"] + tr["bee"] + va["ant"] + va["bee"]
    tr_idx, va_idx, notes = train_val_split(ds, DataConfig(val_fraction=0.5), seed=0)
    assert red(ds.x_train[va_idx]) == va["ant"] + va["bee"] and ds.y_train[va_idx].tolist() == [0, 0, 1]
    assert red(ds.x_train[tr_idx]) == tr["ant"] + tr["bee"] and notes == []      # val_fraction not used
    # ... and the test split, said in one line
    assert red(ds.x_test) == va["ant"] + va["bee"] and ds.y_test.tolist() == [0, 0, 1]
    (line,) = [n for n in ds.notes if "val/ is the validation split" in n]
    assert "also the test split" in line and "\n" not in line


def test_train_val_and_test_folders(tmp_path):
    _tree(tmp_path / "train", {"ant": 4, "bee": 4})
    va = _tree(tmp_path / "val", {"ant": 1, "bee": 1}, start=100)
    te = _tree(tmp_path / "test", {"ant": 2, "bee": 2}, start=200)
    ds = load(tmp_path)
    _, va_idx, _ = train_val_split(ds, DataConfig(), seed=0)
    assert red(ds.x_train[va_idx]) == va["ant"] + va["bee"]
    assert red(ds.x_test) == te["ant"] + te["bee"]
    assert not any("also the test split" in n for n in ds.notes)


def test_one_folder_is_split_by_fraction_stratified_and_seeded(tmp_path):
    tmp_path = tmp_path / "photos"        # beside the test's cache folder, not one of its classes
    values = _tree(tmp_path, {"ant": 10, "bee": 20, "cat": 30})
    a = load(tmp_path, test_fraction=0.2, split_seed=0)
    b = load(tmp_path, test_fraction=0.2, split_seed=0)
    c = load(tmp_path, test_fraction=0.2, split_seed=1)
    assert np.bincount(a.y_test.numpy()).tolist() == [2, 4, 6]              # stratified: 20% of each class
    assert np.bincount(a.y_train.numpy()).tolist() == [8, 16, 24]
    everything = sorted(v for vs in values.values() for v in vs)
    assert sorted(red(a.x_train) + red(a.x_test)) == everything             # a partition: nothing lost
    assert not set(red(a.x_train)) & set(red(a.x_test))
    assert red(a.x_test) == red(b.x_test)                                   # split_seed fixes it
    assert red(a.x_test) != red(c.x_test)
    # a train/ folder alone is split the same way, and the run says so
    _tree(tmp_path / "x" / "train", {"ant": 5, "bee": 5})
    d = load(tmp_path / "x", test_fraction=0.4)
    assert np.bincount(d.y_test.numpy()).tolist() == [2, 2]
    assert any("test_fraction = 0.4 of it is the test split" in n for n in d.notes)


def test_labels_csv_with_and_without_a_split_column_and_a_tsv(tmp_path):
    pics = tmp_path / "pics"
    for i in range(12):
        _img(pics / f"{i}.png", 10 + i)
    names = ["red fox", "Ñandú"] * 6                     # spaces and non-ASCII letters
    (tmp_path / "labels.csv").write_text(
        "filename,label\n" + "".join(f"pics/{i}.png,{names[i]}\n" for i in range(12)), encoding="utf-8")
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(tmp_path), labels="labels.csv", classes=0,
                                 test_fraction=0.5), quiet=True)
    assert ds.classes == ["red fox", "Ñandú"]
    assert np.bincount(ds.y_test.numpy()).tolist() == [3, 3]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):          # each image kept its own label
        assert [names[v - 10] for v in red(x)] == [ds.classes[k] for k in y.tolist()]
    split = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    (tmp_path / "labels.tsv").write_text(
        "".join(f"{pics / f'{i}.png'}\t{names[i]}\t{split[i]}\n" for i in range(12)), encoding="utf-8")
    ds = load_dataset(DataConfig(source="imagefolder", labels=str(tmp_path / "labels.tsv"), classes=0), quiet=True)
    _, va_idx, _ = train_val_split(ds, DataConfig(), seed=0)
    assert red(ds.x_train[va_idx]) == [18, 19] and red(ds.x_test) == [20, 21]
    assert ds.y_test.tolist() == [0, 1]


def test_a_folder_name_in_nfd_and_the_same_name_typed_in_nfc_are_one_class(tmp_path):
    nfd = unicodedata.normalize("NFD", "Ñandú")           # how macOS stores the folder name
    assert nfd != "Ñandú"
    _tree(tmp_path / "train", {nfd: 3, "zorro rojo": 3})
    _tree(tmp_path / "test", {"Ñandú": 1, "zorro rojo": 1}, start=50)
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(tmp_path), classes=["Ñandú"]), quiet=True)
    assert ds.classes == ["Ñandú"] and len(ds.y_train) == 3 and red(ds.x_test) == [50]


# ---------------------------------------------------------------- one clear line for what cannot be used

@pytest.mark.parametrize("make, match", [
    (lambda r: (_tree(r / "train", {"ant": 2}), _tree(r / "test", {"ant": 1, "wasp": 1})),
     r"test/wasp is a class folder in test/ but not in train/ \(train/ has ant\)"),
    (lambda r: (_tree(r / "train", {"ant": 2}), (r / "train" / "bee").mkdir(), _tree(r / "test", {"ant": 1})),
     r"class folder .*train/bee has no images; add some or remove the folder"),
    (lambda r: (_tree(r / "train", {"ant": 2, "bee": 2}), _tree(r / "val", {"ant": 1}), (r / "val" / "bee").mkdir()),
     r"class folder .*val/bee has no images"),
    (lambda r: (_tree(r / "val", {"ant": 2}),), r"val has no train/ beside it"),
    (lambda r: _tree(r, {"ant": 3, "bee": 1}), r"class 'bee' .* has only 1 image"),
])
def test_an_unusable_folder_is_one_line_naming_it(tmp_path, make, match):
    make(tmp_path / "photos")
    with pytest.raises(DataError, match=match) as e:
        load(tmp_path / "photos")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rows, match", [
    ("a.png,ant,train\nb.png,ant,train\nc.png,bee,test\n", r"line 3: label 'bee' names no class"),
    ("a.png,ant,train\nb.png,ant,holdout\n", r"line 2: split 'holdout' is not train, val or test"),
    ("a.png,ant\nmissing.png,ant\n", r"line 2: image .*missing.png not found"),
    ("a.png,ant\na.png,bee\n", r"line 2: a.png is listed twice \(first on line 1\)"),
    ("a.png,ant\nb.png\n", r"line 2: expected path,label"),
    ("a.png,ant,train\nb.png,ant,train\n", r"has train rows only"),
])
def test_an_unusable_labels_file_is_one_line_naming_the_line(tmp_path, rows, match):
    for name in ("a.png", "b.png", "c.png"):
        _img(tmp_path / name, 1)
    (tmp_path / "labels.csv").write_text(rows)
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(source="imagefolder", labels=str(tmp_path / "labels.csv")), quiet=True)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    _tree(tmp_path / "photos" / "train", {"ant": 2})
    _tree(tmp_path / "photos" / "test", {"wasp": 1})
    r = cli(["run", "practice/03_adam20", "--set", "data.source=imagefolder", "--set", f"data.data_dir={tmp_path / 'photos'}",
             "--set", "data.classes=0", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert r.returncode == 2
    assert "wasp is a class folder in test/ but not in train/" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- defaults that suit photos

def test_a_practice_class_count_takes_all_classes_and_suggests_classes_0(tmp_path):
    _tree(tmp_path / "train", {"ant": 2, "bee": 2, "cat": 2})
    _tree(tmp_path / "test", {"ant": 1, "bee": 1, "cat": 1}, start=50)
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(tmp_path), classes=25), quiet=True)
    assert ds.classes == ["ant", "bee", "cat"]
    (line,) = [n for n in ds.notes if "classes = 25" in n]
    assert "taking all 3" in line and "classes = 0" in line


def test_mixed_size_jpegs_are_resized_to_256_with_one_line(tmp_path):
    for k, name in enumerate(["ant", "bee"]):
        for i, size in enumerate([(320, 240), (200, 300), (640, 480)]):
            _img(tmp_path / "train" / name / f"{i}.jpg", 40 + k, size=size, fmt="JPEG")
        _img(tmp_path / "val" / name / "0.jpg", 40 + k, size=(500, 375), fmt="JPEG")
    ds = load(tmp_path)                                   # image_size = 0, the default
    assert ds.x_train.shape[1:] == (3, 256, 256) and ds.x_test.shape == (2, 3, 256, 256)
    (line,) = [n for n in ds.notes if "different sizes" in n]
    assert "256x256" in line and "image_size" in line


def test_a_practice_config_on_photos_validates_on_every_class(tmp_path):
    """practice/*.toml hold out the *last* 10% (Keras's validation_split), which for a folder sorted by class
    is one class only; on a folder the run switches to a stratified split and says so."""
    from cnnlab.config import load_config
    from cnnlab.configs import config_file
    from cnnlab.experiments.prepare import prepare
    _tree(tmp_path / "photos" / "train", {"ant": 10, "bee": 10})
    _tree(tmp_path / "photos" / "test", {"ant": 2, "bee": 2}, start=100)
    cfg = load_config(config_file("practice/03_adam20"),
                      [("data.source", "imagefolder"), ("data.data_dir", str(tmp_path / "photos")),
                       ("data.classes", 0), ("data.image_size", 32), ("train.batch_size", 4)])
    assert cfg.data.val_split == "last"
    plan = prepare(cfg, progress="none")
    assert sorted(set(plan.data.y_train[plan.va_idx].tolist())) == [0, 1]
    assert any("val_split = 'last'" in n and "stratified" in n for n in plan.notes)
