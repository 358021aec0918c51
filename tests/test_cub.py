"""Caltech-UCSD Birds sources on tiny fake trees in the official layouts: no network, a few seconds."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab.data.images as images_mod
from cnnlab.config import DataConfig
from cnnlab.data import cub, load_dataset
from cnnlab.errors import DataError

FOLDERS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
NAMES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
# Per class: (train, test) image counts; uneven so that wrong labels or splits show.
COUNTS = [(2, 1), (3, 2), (1, 2)]
N_TRAIN, N_TEST = sum(c[0] for c in COUNTS), sum(c[1] for c in COUNTS)


def level(k: int) -> int:
    """Each class's images are one grey level, so an image's label can be checked from its pixels."""
    return 40 + 80 * k


def _save(path: Path, k: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (level(k),) * 3).convert(mode).save(path, quality=95)


def _records():
    """[(relative path, class index, is_train)] in class order; one grayscale and one CMYK JPEG."""
    out = []
    for k, (folder, (n_tr, n_te)) in enumerate(zip(FOLDERS, COUNTS)):
        bird = folder.split(".", 1)[1]
        for j in range(n_tr + n_te):
            out.append((f"{folder}/{bird}_{j:04d}.jpg", k, j < n_tr))
    return out


MODES = {1: "L", 6: "CMYK"}    # record index -> image mode (a train grayscale image, a test CMYK image)


def make_2010(folder: Path) -> Path:
    """<folder>/images/<class>/<file>.jpg and <folder>/lists/{train,test,classes}.txt, as the archives unpack."""
    recs = _records()
    for i, (rel, k, _) in enumerate(recs):
        _save(folder / "images" / rel, k, MODES.get(i, "RGB"))
    (folder / "images" / "._junk").write_bytes(b"\0AppleDouble")   # the official archive holds such files
    lists = folder / "lists"
    lists.mkdir(parents=True)
    (lists / "classes.txt").write_text("\n".join(FOLDERS) + "\n")
    (lists / "train.txt").write_text("\n".join(r for r, _, t in recs if t) + "\n")
    (lists / "test.txt").write_text("\n".join(r for r, _, t in recs if not t) + "\n")
    return folder


def make_2011(folder: Path) -> Path:
    """<folder> = CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt."""
    recs = _records()
    for i, (rel, k, _) in enumerate(recs):
        _save(folder / "images" / rel, k, MODES.get(i, "RGB"))
    (folder / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, (r, _, _) in enumerate(recs)))
    (folder / "image_class_labels.txt").write_text("".join(f"{i + 1} {k + 1}\n" for i, (_, k, _) in enumerate(recs)))
    (folder / "train_test_split.txt").write_text("".join(f"{i + 1} {int(t)}\n" for i, (_, _, t) in enumerate(recs)))
    (folder / "classes.txt").write_text("".join(f"{k + 1} {f}\n" for k, f in enumerate(FOLDERS)))
    return folder


def expected_labels(train: bool) -> list[int]:
    return [k for _, k, t in _records() if t == train]


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "default-data"))
    monkeypatch.delenv("CNNLAB_DOWNLOAD_MIRROR", raising=False)


def tree(tmp_path: Path, source: str) -> tuple[Path, Path]:
    """(data folder, folder holding images/) of a fake tree for `source`."""
    data = tmp_path / "data"
    if source == "cub200-2010":
        return data, make_2010(data / "CUB_200_2010")
    return data, make_2011(data / "CUB_200_2011")


def cfg(data: Path, source: str, **kw) -> DataConfig:
    return DataConfig(**{"source": source, "data_dir": str(data), "classes": 0, "image_size": 32,
                         "download": False, **kw})


def check(ds, n_train=N_TRAIN, n_test=N_TEST):
    assert ds.classes == NAMES
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (n_test, 3, 32, 32)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.uint8
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert y.dtype == torch.int64
        means = x.float().mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(means, [level(int(k)) for k in y], atol=4)   # pixels match their label
        assert (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()         # grey stays grey in RGB


SOURCES = ["cub200-2010", "cub200-2011"]


@pytest.mark.parametrize("source", SOURCES)
def test_loads_official_layout(tmp_path, source):
    data, _ = tree(tmp_path, source)
    ds = load_dataset(cfg(data, source), quiet=True)
    check(ds)
    assert ds.y_train.tolist() == expected_labels(True)
    assert ds.y_test.tolist() == expected_labels(False)
    assert ds.name == source


@pytest.mark.parametrize("source", SOURCES)
def test_class_selection_and_caps(tmp_path, source):
    data, _ = tree(tmp_path, source)
    ds = load_dataset(cfg(data, source, classes=["Sooty_Albatross", "Laysan_Albatross"], max_train_per_class=2),
                      quiet=True)
    assert ds.classes == ["Sooty_Albatross", "Laysan_Albatross"]
    assert ds.y_train.tolist() == [1, 1, 0] and ds.y_test.tolist() == [1, 1, 0, 0]
    assert ds.x_train.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([level(1)] * 2 + [level(2)], abs=4)


def test_default_size_is_256(tmp_path):
    data, _ = tree(tmp_path, "cub200-2011")
    ds = load_dataset(cfg(data, "cub200-2011", image_size=0, classes=1), quiet=True)
    assert ds.x_train.shape[1:] == (3, 256, 256)


@pytest.mark.parametrize("source", SOURCES)
def test_corrupt_image_is_an_error_or_skipped(tmp_path, source, capsys):
    data, folder = tree(tmp_path, source)
    bad = folder / "images" / _records()[3][0]            # a train image of class 1
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=bad.name):
        load_dataset(cfg(data, source), quiet=True)
    ds = load_dataset(cfg(data, source, skip_corrupt=True), quiet=True)
    assert bad.name in capsys.readouterr().err and ds.skipped[0][0] == str(bad)
    check(ds, N_TRAIN - 1, N_TEST)
    labels = expected_labels(True)
    labels.remove(1)
    assert ds.y_train.tolist() == labels


@pytest.mark.parametrize("source", SOURCES)
def test_missing_listed_image(tmp_path, source, capsys):
    data, folder = tree(tmp_path, source)
    gone = folder / "images" / _records()[0][0]
    gone.unlink()
    with pytest.raises(DataError, match=gone.name):
        load_dataset(cfg(data, source), quiet=True)
    ds = load_dataset(cfg(data, source, skip_corrupt=True), quiet=True)
    assert gone.name in capsys.readouterr().err and ds.skipped == [(str(gone), "listed but missing")]
    assert len(ds.x_train) == N_TRAIN - 1


@pytest.mark.parametrize("source", SOURCES)
def test_decode_cache_reused_and_invalidated(tmp_path, monkeypatch, source):
    data, folder = tree(tmp_path, source)
    first = load_dataset(cfg(data, source), quiet=True)
    real_decode = images_mod.read_image

    def no_decode(*a, **k):
        raise AssertionError("decoded JPEGs although the cache should have been used")

    monkeypatch.setattr(images_mod, "read_image", no_decode)
    again = load_dataset(cfg(data, source), quiet=True)
    assert (again.x_train == first.x_train).all() and (again.y_test == first.y_test).all()
    with pytest.raises(AssertionError, match="decoded JPEGs"):          # another size: a new cache
        load_dataset(cfg(data, source, image_size=24), quiet=True)

    # A changed file invalidates the cache too.
    calls = []
    monkeypatch.setattr(images_mod, "read_image", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    _save(folder / "images" / _records()[0][0], 2)
    changed = load_dataset(cfg(data, source), quiet=True)
    assert calls and changed.x_train[0].float().mean() == pytest.approx(level(2), abs=4)


def test_2011_bad_metadata(tmp_path):
    data, folder = tree(tmp_path, "cub200-2011")
    (folder / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="image_class_labels.txt"):
        load_dataset(cfg(data, "cub200-2011"), quiet=True)


def test_2010_list_cannot_escape(tmp_path):
    data, folder = tree(tmp_path, "cub200-2010")
    (folder / "lists" / "train.txt").write_text("001.Black_footed_Albatross/../../../secret.jpg\n")
    with pytest.raises(DataError, match="secret.jpg"):
        load_dataset(cfg(data, "cub200-2010"), quiet=True)


# ---- downloads: official archive structure, served from a loopback HTTP server ------------------------

def _tgz(path: Path, members: dict[str, Path] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A .tgz holding each folder of `members` under its archive name (plus raw `extra` file members)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, src in (members or {}).items():
            tf.add(src, arcname=name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/served on 127.0.0.1 and points CNNLAB_DOWNLOAD_MIRROR at it."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("CNNLAB_DOWNLOAD_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}/")
    yield served
    httpd.shutdown()
    httpd.server_close()


def official_2010(tmp_path: Path, served: Path) -> None:
    src = make_2010(tmp_path / "src2010")
    _tgz(served / "images.tgz", {"images": src / "images"}, {"._images": b"\0AppleDouble"})
    _tgz(served / "lists.tgz", {"lists": src / "lists"})


def official_2011(tmp_path: Path, served: Path) -> str:
    src = make_2011(tmp_path / "src2011" / "CUB_200_2011")
    return _md5(_tgz(served / "CUB_200_2011.tgz", {"CUB_200_2011": src}, {"attributes.txt": b"1 has_bill_shape\n"}))


def with_md5(spec, md5):
    return dataclasses.replace(spec, archives=tuple(dataclasses.replace(a, md5=md5) for a in spec.archives))


def test_download_2010(tmp_path, server):
    official_2010(tmp_path, server)
    data = tmp_path / "data"
    ds = load_dataset(cfg(data, "cub200-2010", download=True), quiet=True)
    check(ds)
    folder = data / "CUB_200_2010"
    assert (folder / "images.tgz").is_file() and (folder / "lists" / "train.txt").is_file()
    assert not (folder / "._images").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]   # no temp folders left


def test_download_2011(tmp_path, server, monkeypatch):
    md5 = official_2011(tmp_path, server)
    monkeypatch.setattr(cub, "CUB2011", with_md5(cub.CUB2011, md5))
    data = tmp_path / "data"
    ds = load_dataset(cfg(data, "cub200-2011", download=True), quiet=True)
    check(ds)
    assert (data / "CUB_200_2011.tgz").is_file() and (data / "CUB_200_2011" / "images.txt").is_file()
    # The extracted folder is used as is from now on, even offline.
    monkeypatch.setenv("CNNLAB_DOWNLOAD_MIRROR", "http://127.0.0.1:9/")
    check(load_dataset(cfg(data, "cub200-2011", download=False), quiet=True))


def test_download_md5_mismatch(tmp_path, server, monkeypatch):
    official_2011(tmp_path, server)
    monkeypatch.setattr(cub, "CUB2011", with_md5(cub.CUB2011, "0" * 32))
    data = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(cfg(data, "cub200-2011", download=True), quiet=True)
    assert not (data / "CUB_200_2011.tgz").exists() and not (data / "CUB_200_2011").exists()


def test_local_archive_is_extracted_without_network(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    md5 = official_2011(tmp_path, data)                  # the archive already sits in the data folder
    monkeypatch.setattr(cub, "CUB2011", with_md5(cub.CUB2011, md5))
    check(load_dataset(cfg(data, "cub200-2011", download=False), quiet=True))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source,file", [("cub200-2010", "images.tgz"), ("cub200-2011", "CUB_200_2011.tgz")])
def test_offline_error_names_file_url_and_folder(tmp_path, monkeypatch, source, file):
    mirror = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("CNNLAB_DOWNLOAD_MIRROR", mirror)
    data = tmp_path / "data"
    folder = data / "CUB_200_2010" if source == "cub200-2010" else data
    with pytest.raises(DataError) as e:
        load_dataset(cfg(data, source, download=True), quiet=True)
    msg = str(e.value)
    assert file in msg and f"{mirror}/{file}" in msg and str(folder) in msg


@pytest.mark.parametrize("source", SOURCES)
def test_downloads_off_error(tmp_path, source):
    data = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_dataset(cfg(data, source, download=False), quiet=True)
    msg = str(e.value)
    spec = cub.CUB2010 if source == "cub200-2010" else cub.CUB2011
    for a in spec.archives:                               # every missing archive, its address, the folder
        assert a.url in msg and a.url.rsplit("/", 1)[1] in msg
    assert str(data / spec.root if spec.root else data) in msg and "download = " in msg


def test_2010_only_lists_missing(tmp_path):
    data, folder = tree(tmp_path, "cub200-2010")
    for f in (folder / "lists").iterdir():
        f.unlink()
    (folder / "lists").rmdir()
    with pytest.raises(DataError) as e:
        load_dataset(cfg(data, "cub200-2010"), quiet=True)
    assert "lists.tgz" in str(e.value) and "images.tgz" not in str(e.value)


def test_archive_with_parent_member_is_refused(tmp_path, server, monkeypatch):
    src = make_2011(tmp_path / "src2011" / "CUB_200_2011")
    arc = _tgz(server / "CUB_200_2011.tgz", {"CUB_200_2011": src}, {"../evil.txt": b"owned"})
    monkeypatch.setattr(cub, "CUB2011", with_md5(cub.CUB2011, _md5(arc)))
    data = tmp_path / "data"
    with pytest.raises(DataError, match="outside"):
        load_dataset(cfg(data, "cub200-2011", download=True), quiet=True)
    assert not (tmp_path / "evil.txt").exists() and not (data / "evil.txt").exists()
    assert not (data / "CUB_200_2011").exists()


def test_truncated_archive(tmp_path, server, monkeypatch):
    official_2011(tmp_path, server)
    arc = server / "CUB_200_2011.tgz"
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    monkeypatch.setattr(cub, "CUB2011", with_md5(cub.CUB2011, None))
    data = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_dataset(cfg(data, "cub200-2011", download=True), quiet=True)
    assert not (data / "CUB_200_2011").exists()
