"""Data sources: CIFAR archives in the official layout, downloads, safe extraction, image folders, splits."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import tarfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab.data.cifar as cifar_mod
import cnnlab.data.images as images_mod
from cnnlab.config import DataConfig
from cnnlab.data import load_dataset, select, split_train_val
from cnnlab.data.download import MIRROR_ENV, extract
from cnnlab.errors import DataError

# ---------------------------------------------------------------- tiny official-format archives


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _images(n: int, seed: int) -> np.ndarray:
    """n random CIFAR rows (uint8, n x 3072); the first two bytes encode the record number."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    x[:, 0] = np.arange(n) // 256
    x[:, 1] = np.arange(n) % 256
    return x


def _labels(num_classes: int, per_class: int, seed: int) -> list[int]:
    """Each class `per_class` times, in a shuffled record order (like the official files)."""
    y = np.repeat(np.arange(num_classes), per_class)
    np.random.default_rng(seed).shuffle(y)
    return [int(v) for v in y]


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)      # the official files are Python 2 pickles


def _tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def make_cifar10_folder(root: Path, per_class_batch: int = 1, per_class_test: int = 2) -> dict:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta; returns the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        y = _labels(10, per_class_batch, seed=b)
        x = _images(len(y), seed=100 + b)
        _dump({"batch_label": f"training batch {b} of 5", "labels": y, "data": x,
               "filenames": [f"img_{b}_{i}.png" for i in range(len(y))]}, folder / f"data_batch_{b}")
        xs.append(x)
        ys += y
    yt = _labels(10, per_class_test, seed=9)
    xt = _images(len(yt), seed=200)
    _dump({"batch_label": "testing batch 1 of 1", "labels": yt, "data": xt,
           "filenames": [f"t_{i}.png" for i in range(len(yt))]}, folder / "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump({"num_cases_per_batch": 10, "label_names": names, "num_vis": 3072}, folder / "batches.meta")
    return {"folder": folder, "x_train": np.concatenate(xs), "y_train": np.array(ys), "x_test": xt,
            "y_test": np.array(yt), "names": names}


def make_cifar100_folder(root: Path, per_class_train: int = 3, per_class_test: int = 2,
                         protocol: int = 2) -> dict:
    """cifar-100-python/ with train, test and meta (fine and coarse labels); returns the arrays written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine{i:03d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    out = {"folder": folder, "names": fine_names}
    for split, per, seed in (("train", per_class_train, 1), ("test", per_class_test, 2)):
        y = _labels(100, per, seed)
        x = _images(len(y), seed + 10)
        d = {"filenames": [f"{split}_{i}.png" for i in range(len(y))], "batch_label": f"{split} batch",
             "fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        out[f"x_{split}"], out[f"y_{split}"] = x, np.array(y)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f, protocol=protocol)
    return out


def make_cifar100_archive(where: Path, **kw) -> tuple[Path, dict]:
    """cifar-100-python.tar.gz in `where` (built in a scratch folder so no extracted copy is left beside it)."""
    scratch = where.parent / (where.name + "-scratch")
    info = make_cifar100_folder(scratch, **kw)
    where.mkdir(parents=True, exist_ok=True)
    archive = _tar_folder(info["folder"], where / "cifar-100-python.tar.gz")
    shutil.rmtree(scratch)
    return archive, info


def expected_selection(x: np.ndarray, y: np.ndarray, keep: list[int], cap: int = 0):
    """Reference implementation of class selection + per-class caps, one record at a time."""
    seen = {c: 0 for c in keep}
    xs, ys = [], []
    for xi, yi in zip(x, y):
        yi = int(yi)
        if yi in seen and (not cap or seen[yi] < cap):
            seen[yi] += 1
            xs.append(xi)
            ys.append(keep.index(yi))
    return np.stack(xs).reshape(-1, 3, 32, 32), np.array(ys)


def quiet_load(cfg: DataConfig):
    """load_dataset, ignoring the md5 warnings that locally made files always raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(cfg, quiet=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- CIFAR-100 / CIFAR-10 loading

def test_cifar100_archive_default_25_classes(tmp_path):
    data = tmp_path / "data"
    archive, info = make_cifar100_archive(data)
    with pytest.warns(UserWarning, match="md5"):
        ds = load_dataset(DataConfig(source="cifar100"), quiet=True)   # data_dir "" -> $CNNLAB_DATA
    assert (data / "cifar-100-python" / "train").is_file()              # extracted beside the archive
    assert ds.x_train.shape == (75, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (50, 3, 32, 32) and ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == torch.int64
    assert ds.classes == info["names"][:25] and ds.num_classes == 25
    assert sorted(set(ds.y_train.tolist())) == list(range(25))
    xe, ye = expected_selection(info["x_train"], info["y_train"], list(range(25)))
    assert np.array_equal(ds.x_train.numpy(), xe) and np.array_equal(ds.y_train.numpy(), ye)
    xe, ye = expected_selection(info["x_test"], info["y_test"], list(range(25)))
    assert np.array_equal(ds.x_test.numpy(), xe) and np.array_equal(ds.y_test.numpy(), ye)


def test_cifar100_extracted_folder_md5_mismatch_warns_but_reads(tmp_path):
    info = make_cifar100_folder(tmp_path / "mydata")
    with pytest.warns(UserWarning, match=r"differ from the official files \(md5\)"):
        ds = load_dataset(DataConfig(source="cifar100", data_dir=str(tmp_path / "mydata"), classes=0,
                                     download=False), quiet=True)
    assert ds.x_train.shape == (300, 3, 32, 32) and ds.x_test.shape == (200, 3, 32, 32)
    assert np.array_equal(ds.x_train.numpy(), info["x_train"].reshape(-1, 3, 32, 32))
    assert np.array_equal(ds.y_train.numpy(), info["y_train"])
    assert ds.classes == info["names"]


def test_a_folder_read_again_in_one_process_warns_once(tmp_path):
    """A suite, seeds or --folds read one folder many times: one md5 check, one warning; a rewritten file is
    checked again."""
    import warnings
    make_cifar100_folder(tmp_path / "d")
    cfg = DataConfig(source="cifar100", data_dir=str(tmp_path / "d"), classes=0, download=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            load_dataset(cfg, quiet=True)
        assert sum("differ from the official" in str(w.message) for w in seen) == 1
        meta = tmp_path / "d" / "cifar-100-python" / "meta"
        meta.write_bytes(meta.read_bytes())            # rewritten: a new mtime
        os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))
        load_dataset(cfg, quiet=True)
    assert sum("differ from the official" in str(w.message) for w in seen) == 2


def test_cifar100_class_selection_by_index_and_name(tmp_path):
    info = make_cifar100_folder(tmp_path / "d")
    base = dict(source="cifar100", data_dir=str(tmp_path / "d"), download=False)
    ds = quiet_load(DataConfig(**base, classes=[42, 7, 99]))
    assert ds.classes == ["fine042", "fine007", "fine099"]
    xe, ye = expected_selection(info["x_train"], info["y_train"], [42, 7, 99])
    assert np.array_equal(ds.x_train.numpy(), xe) and np.array_equal(ds.y_train.numpy(), ye)
    assert sorted(ds.y_train.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    by_name = quiet_load(DataConfig(**base, classes=["fine042", "fine007", "fine099"]))
    assert torch.equal(by_name.x_train, ds.x_train) and torch.equal(by_name.y_train, ds.y_train)
    assert torch.equal(by_name.x_test, ds.x_test) and torch.equal(by_name.y_test, ds.y_test)


def test_cifar100_per_class_caps_take_first_records(tmp_path):
    info = make_cifar100_folder(tmp_path / "d", per_class_train=3, per_class_test=2)
    ds = quiet_load(DataConfig(source="cifar100", data_dir=str(tmp_path / "d"), classes=10,
                               max_train_per_class=2, max_test_per_class=1))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert np.bincount(ds.y_train.numpy()).tolist() == [2] * 10
    xe, ye = expected_selection(info["x_train"], info["y_train"], list(range(10)), cap=2)
    assert np.array_equal(ds.x_train.numpy(), xe) and np.array_equal(ds.y_train.numpy(), ye)
    # the record numbers stored in the first bytes are increasing: record order is kept
    rec = ds.x_train.numpy()[:, 0, 0, 0].astype(int) * 256 + ds.x_train.numpy()[:, 0, 0, 1]
    assert (np.diff(rec) > 0).all()
    xe, ye = expected_selection(info["x_test"], info["y_test"], list(range(10)), cap=1)
    assert np.array_equal(ds.x_test.numpy(), xe) and np.array_equal(ds.y_test.numpy(), ye)


def test_cifar100_bad_class_specs(tmp_path):
    make_cifar100_folder(tmp_path / "d")
    base = dict(source="cifar100", data_dir=str(tmp_path / "d"))
    with pytest.raises(DataError, match="only 100 classes"):
        quiet_load(DataConfig(**base, classes=101))
    with pytest.raises(DataError, match="'nosuch' is not a class"):
        quiet_load(DataConfig(**base, classes=["nosuch"]))
    with pytest.raises(DataError, match="out of range"):
        quiet_load(DataConfig(**base, classes=[100]))
    with pytest.raises(DataError, match="listed twice"):
        quiet_load(DataConfig(**base, classes=[3, "fine003"]))


def test_cifar100_locally_pickled_with_highest_protocol(tmp_path):
    """A locally made copy pickled with pickle.HIGHEST_PROTOCOL (numpy uses _frombuffer) still reads."""
    info = make_cifar100_folder(tmp_path / "d", protocol=pickle.HIGHEST_PROTOCOL)
    ds = quiet_load(DataConfig(source="cifar100", data_dir=str(tmp_path / "d"), classes=0))
    assert np.array_equal(ds.x_train.numpy(), info["x_train"].reshape(-1, 3, 32, 32))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    make_cifar100_folder(tmp_path / "d")
    (tmp_path / "d" / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"x": os.system}, protocol=2))
    with pytest.raises(DataError, match="refusing to load") as e:
        quiet_load(DataConfig(source="cifar100", data_dir=str(tmp_path / "d")))
    assert "meta" in str(e.value)


def test_cifar10_archive(tmp_path):
    scratch = tmp_path / "scratch"
    info = make_cifar10_folder(scratch)
    data = tmp_path / "c10"
    data.mkdir()
    _tar_folder(info["folder"], data / "cifar-10-python.tar.gz")
    ds = quiet_load(DataConfig(source="cifar10", data_dir=str(data), classes=0))
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.classes == info["names"]
    assert np.array_equal(ds.x_train.numpy(), info["x_train"].reshape(-1, 3, 32, 32))
    assert np.array_equal(ds.y_train.numpy(), info["y_train"])      # batches 1..5 in order
    assert np.array_equal(ds.y_test.numpy(), info["y_test"])
    ds3 = quiet_load(DataConfig(source="cifar10", data_dir=str(data), classes=["cat", "ship"],
                                max_train_per_class=3))
    assert ds3.classes == ["cat", "ship"]
    xe, ye = expected_selection(info["x_train"], info["y_train"], [3, 8], cap=3)
    assert np.array_equal(ds3.x_train.numpy(), xe) and np.array_equal(ds3.y_train.numpy(), ye)


def test_cifar10_folder_missing_a_batch_uses_the_archive_or_fails(tmp_path):
    info = make_cifar10_folder(tmp_path / "d")
    (info["folder"] / "data_batch_3").unlink()
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        quiet_load(DataConfig(source="cifar10", data_dir=str(tmp_path / "d"), download=False))


# ---------------------------------------------------------------- corrupt and malicious archives

def test_truncated_archive_leaves_nothing_behind(tmp_path):
    data = tmp_path / "data"
    archive, _ = make_cifar100_archive(data)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        quiet_load(DataConfig(source="cifar100"))
    assert "cifar-100-python.tar.gz" in str(e.value)
    assert leftovers(data) == ["cifar-100-python.tar.gz"]       # no extracted folder, no temp folder


def test_archive_without_expected_folder(tmp_path):
    data = tmp_path / "data"
    other = tmp_path / "x" / "something-else"
    other.mkdir(parents=True)
    (other / "train").write_bytes(b"1")
    data.mkdir()
    _tar_folder(other, data / "cifar-100-python.tar.gz")
    with pytest.raises(DataError, match="does not contain cifar-100-python"):
        quiet_load(DataConfig(source="cifar100"))
    assert leftovers(data) == ["cifar-100-python.tar.gz"]


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes = b"evil") -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _malicious_archive(data: Path, bad_name: str) -> Path:
    """A cifar-100-python.tar.gz holding the real layout plus one member that points outside."""
    info = make_cifar100_folder(data.parent / "scratch-evil")
    data.mkdir(parents=True, exist_ok=True)
    archive = data / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(info["folder"], arcname="cifar-100-python")
        _add_bytes(tf, bad_name)
    shutil.rmtree(data.parent / "scratch-evil")
    return archive


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_path_traversal_member_is_refused(tmp_path, kind):
    data = tmp_path / "deep" / "data"
    target = tmp_path / "deep" / "evil.txt" if kind == "dotdot" else tmp_path / "abs_evil.txt"
    bad = "../evil.txt" if kind == "dotdot" else str(target)
    _malicious_archive(data, bad)
    with pytest.raises(DataError, match="outside") as e:
        quiet_load(DataConfig(source="cifar100", data_dir=str(data)))
    assert "cifar-100-python.tar.gz" in str(e.value)
    assert not target.exists()
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert leftovers(data) == ["cifar-100-python.tar.gz"]
    assert leftovers(tmp_path / "deep") == ["data"]


def test_symlink_member_pointing_outside_is_refused(tmp_path):
    data = tmp_path / "data"
    info = make_cifar100_folder(tmp_path / "scratch")
    data.mkdir()
    with tarfile.open(data / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(info["folder"], arcname="cifar-100-python")
        ti = tarfile.TarInfo("cifar-100-python/link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
    with pytest.raises(DataError, match="outside"):
        quiet_load(DataConfig(source="cifar100"))
    assert leftovers(data) == ["cifar-100-python.tar.gz"]


def test_zip_with_path_traversal_is_refused(tmp_path):
    parent = tmp_path / "p" / "data"
    parent.mkdir(parents=True)
    z = parent / "thing.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("thing/ok.txt", "ok")
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(DataError, match="outside"):
        extract(z, parent / "thing", "test")
    assert not (tmp_path / "p" / "evil.txt").exists()
    assert leftovers(parent) == ["thing.zip"]


def test_zip_extracts_atomically(tmp_path):
    z = tmp_path / "thing.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("thing/a/ok.txt", "ok")
    out = extract(z, tmp_path / "thing", "test")
    assert (out / "a" / "ok.txt").read_text() == "ok"
    assert leftovers(tmp_path) == ["thing", "thing.zip"]


# ---------------------------------------------------------------- downloads

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server serving tmp_path/'srv'; yields (folder, base URL)."""
    root = tmp_path / "srv"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_verify_extract_load(tmp_path, http_root, monkeypatch):
    root, url = http_root
    archive, info = make_cifar100_archive(root)
    monkeypatch.setattr(cifar_mod, "CIFAR100", dataclasses.replace(cifar_mod.CIFAR100, md5=_md5(archive)))
    monkeypatch.setenv(MIRROR_ENV, url)
    data = tmp_path / "data"
    assert not data.exists()
    ds = quiet_load(DataConfig(source="cifar100", classes=5))
    assert (data / "cifar-100-python.tar.gz").read_bytes() == archive.read_bytes()
    assert (data / "cifar-100-python" / "meta").is_file()
    assert leftovers(data) == ["cifar-100-python", "cifar-100-python.tar.gz"]     # no .part, no temp folder
    xe, ye = expected_selection(info["x_train"], info["y_train"], list(range(5)))
    assert np.array_equal(ds.x_train.numpy(), xe) and np.array_equal(ds.y_train.numpy(), ye)
    assert ds.classes == info["names"][:5]
    # a second load reads the extracted folder: no server needed
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/")
    again = quiet_load(DataConfig(source="cifar100", classes=5))
    assert torch.equal(again.x_train, ds.x_train)


def test_download_md5_mismatch_keeps_nothing(tmp_path, http_root, monkeypatch):
    root, url = http_root
    make_cifar100_archive(root)
    monkeypatch.setattr(cifar_mod, "CIFAR100", dataclasses.replace(cifar_mod.CIFAR100, md5="0" * 32))
    monkeypatch.setenv(MIRROR_ENV, url)
    with pytest.raises(DataError, match="corrupt") as e:
        quiet_load(DataConfig(source="cifar100"))
    assert "0" * 32 in str(e.value)
    assert leftovers(tmp_path / "data") == []


def test_download_http_error_keeps_nothing(tmp_path, http_root, monkeypatch):
    _, url = http_root                                  # serves an empty folder: 404
    monkeypatch.setenv(MIRROR_ENV, url)
    with pytest.raises(DataError) as e:
        quiet_load(DataConfig(source="cifar10"))
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and f"{url}cifar-10-python.tar.gz" in msg
    assert "file not found" in msg.lower()                # the HTTP reason
    assert leftovers(tmp_path / "data") == []


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_error_names_file_url_and_folder(tmp_path, monkeypatch):
    mirror = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(MIRROR_ENV, mirror)
    data = tmp_path / "data"
    with pytest.raises(DataError) as e:
        quiet_load(DataConfig(source="cifar100"))
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg
    assert f"{mirror}/cifar-100-python.tar.gz" in msg
    assert str(data) in msg
    assert leftovers(data) == []


def test_download_false_with_missing_files(tmp_path):
    with pytest.raises(DataError, match="download = false") as e:
        quiet_load(DataConfig(source="cifar10", data_dir=str(tmp_path / "empty"), download=False))
    assert "cifar-10-python.tar.gz" in str(e.value) and str(tmp_path / "empty") in str(e.value)
    assert not (tmp_path / "empty").exists() or leftovers(tmp_path / "empty") == []


def test_unknown_source():
    with pytest.raises(DataError, match="not a data source"):
        load_dataset(DataConfig(source="mnist"))


# ---------------------------------------------------------------- imagefolder

def _png(path: Path, value: int, size=(8, 6), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (value, (value + 1) % 256, (value + 2) % 256)   # not grey: checks channel order
    im = Image.fromarray(arr)
    if mode == "L":
        im = Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8), mode="L")
    im.save(path)


@pytest.fixture
def image_root(tmp_path):
    """root/{train,test}/{ant,bee,cat}/NN.png; pixel value encodes class and file number."""
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("test", 2)):
        for k, c in enumerate(["ant", "bee", "cat"]):
            for i in range(n):
                _png(root / split / c / f"{i:02d}.png", 10 + 40 * k + i + (20 if split == "test" else 0))
    # one grayscale image among the RGB ones
    _png(root / "train" / "bee" / "05.png", 77, mode="L")
    return root


def test_imagefolder_loads_rgb(image_root):
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(image_root), classes=0), quiet=True)
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.x_train.shape == (13, 3, 6, 8) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (6, 3, 6, 8)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    # file order within a class; centre pixel holds the value written
    assert ds.x_train[:, 0, 3, 3].tolist() == [10, 11, 12, 13, 50, 51, 52, 53, 77, 90, 91, 92, 93]
    grey = ds.x_train[8]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and int(grey[0, 0, 0]) == 77
    # RGB channel order kept
    assert ds.x_train[0, :, 0, 0].tolist() == [10, 11, 12]


def test_imagefolder_caps_and_class_selection(image_root):
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(image_root), classes=["cat", "ant"],
                                 max_train_per_class=2, max_test_per_class=1), quiet=True)
    assert ds.classes == ["cat", "ant"]
    assert ds.y_train.tolist() == [1, 1, 0, 0]     # record order: ant files first, relabelled cat=0, ant=1
    assert ds.x_train[:, 0, 3, 3].tolist() == [10, 11, 90, 91]
    assert ds.x_test[:, 0, 3, 3].tolist() == [30, 110]
    assert ds.y_test.tolist() == [1, 0]
    ds2 = load_dataset(DataConfig(source="imagefolder", data_dir=str(image_root), classes=2), quiet=True)
    assert ds2.classes == ["ant", "bee"] and len(ds2.x_train) == 9


def test_imagefolder_resize(image_root):
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(image_root), classes=0, image_size=4),
                      quiet=True)
    assert ds.x_train.shape == (13, 3, 4, 4)
    assert ds.x_train[1, 0, 2, 2] == 11      # a flat image stays flat when resized


def test_imagefolder_cache_written_and_reused(image_root, tmp_path, monkeypatch):
    cfg = DataConfig(source="imagefolder", data_dir=str(image_root), classes=0)
    first = load_dataset(cfg, quiet=True)
    cache = tmp_path / "cache" / "images"        # $CNNLAB_CACHE/images
    assert len(list(cache.glob("*.u8"))) == 2 and len(list(cache.glob("*.json"))) == 2   # train and test

    def boom(*a, **k):
        raise AssertionError("decode called although the cache is valid")

    monkeypatch.setattr(images_mod, "read_image", boom)
    second = load_dataset(cfg, quiet=True)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_train, second.y_train)
    assert torch.equal(first.x_test, second.x_test)
    # a changed file is decoded again (its row only: see test_stream.py); the stale row is not read
    _png(image_root / "train" / "ant" / "00.png", 200)
    os.utime(image_root / "train" / "ant" / "00.png", ns=(1, 1))
    with pytest.raises(AssertionError, match="decode called"):
        load_dataset(cfg, quiet=True)
    monkeypatch.undo()


def test_imagefolder_corrupt_image(image_root, capsys):
    bad = image_root / "train" / "bee" / "02.png"
    bad.write_bytes(b"this is not a png")
    cfg = DataConfig(source="imagefolder", data_dir=str(image_root), classes=0)
    with pytest.raises(DataError) as e:
        load_dataset(cfg, quiet=True)
    assert str(bad) in str(e.value) and "skip_corrupt" in str(e.value)
    capsys.readouterr()
    ds = load_dataset(dataclasses.replace(cfg, skip_corrupt=True), quiet=True)
    assert "skipped 1" in capsys.readouterr().err and ds.skipped[0][0] == str(bad)     # one summary line
    assert len(ds.x_train) == 12
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.x_train[:, 0, 3, 3].tolist() == [10, 11, 12, 13, 50, 51, 53, 77, 90, 91, 92, 93]


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset(DataConfig(source="imagefolder"), quiet=True)
    (tmp_path / "r" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="test"):
        load_dataset(DataConfig(source="imagefolder", data_dir=str(tmp_path / "r")), quiet=True)


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic():
    cfg = DataConfig(source="synthetic", classes=10, synthetic_train=200, synthetic_test=50)
    a, b = load_dataset(cfg, quiet=True), load_dataset(cfg, quiet=True)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (200, 3, 32, 32) and a.x_train.dtype == torch.uint8
    assert np.bincount(a.y_train.numpy()).tolist() == [20] * 10
    assert not torch.equal(a.x_train[:50], a.x_test)       # train and test differ


# ---------------------------------------------------------------- validation split

def test_stratified_split_per_class_and_seeded():
    y = torch.arange(1000) % 10
    tr, va = split_train_val(y, 0.1, "stratified", seed=0)
    assert len(va) == 100 and len(tr) == 900
    assert torch.bincount(y[va], minlength=10).tolist() == [10] * 10
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(1000))     # a partition
    tr2, va2 = split_train_val(y, 0.1, "stratified", seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = split_train_val(y, 0.1, "stratified", seed=1)
    assert not torch.equal(va, va3)
    assert torch.bincount(y[va3], minlength=10).tolist() == [10] * 10


def test_stratified_split_unbalanced_classes():
    y = torch.tensor([0] * 200 + [1] * 50 + [2] * 30)[torch.randperm(280, generator=torch.Generator().manual_seed(3))]
    _, va = split_train_val(y, 0.2, "stratified", seed=5)
    assert torch.bincount(y[va], minlength=3).tolist() == [40, 10, 6]


def test_last_and_first_splits_are_unshuffled():
    y = torch.arange(100) // 10          # sorted by class: the 'last' trap
    tr, va = split_train_val(y, 0.1, "last", seed=123)
    assert va.tolist() == list(range(90, 100)) and tr.tolist() == list(range(90))
    assert set(y[va].tolist()) == {9}
    tr, va = split_train_val(y, 0.1, "first", seed=123)
    assert va.tolist() == list(range(10)) and tr.tolist() == list(range(10, 100))
    assert split_train_val(y, 0.1, "last", seed=1)[1].tolist() == split_train_val(y, 0.1, "last", seed=2)[1].tolist()


def test_random_split_and_zero_fraction():
    y = torch.arange(50) % 5
    tr, va = split_train_val(y, 0.2, "random", seed=0)
    assert len(va) == 10 and sorted(torch.cat([tr, va]).tolist()) == list(range(50))
    assert not torch.equal(va, split_train_val(y, 0.2, "random", seed=1)[1])
    tr, va = split_train_val(y, 0.0, "stratified", seed=0)
    assert len(va) == 0 and tr.tolist() == list(range(50))


def test_select_helper_caps_in_record_order():
    x = np.arange(12)
    y = np.array([2, 0, 2, 1, 2, 0, 2, 1, 0, 2, 0, 1])
    xs, ys = select(x, y, [2, 1], cap=2)
    assert xs.tolist() == [0, 2, 3, 7] and ys.tolist() == [0, 0, 1, 1]
