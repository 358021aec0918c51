"""Messages that say what is wrong and what to do: damaged checkpoints, skipped images; and large JPEGs decoded
at reduced size."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import cnnlab.data.images as images_mod
from cnnlab.config import DataConfig, from_dict
from cnnlab.data import load_dataset
from cnnlab.errors import CheckpointError, DataError
from cnnlab.experiments.run import run_experiment
from cnnlab.records.io import load_checkpoint
from cnnlab.records.runs import RunFolder, RunRecorder

from conftest import cli


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    cfg = from_dict({"name": "msg", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 160,
                                             "synthetic_test": 40},
                     "model": {"name": "basenet"},
                     "train": {"optimizer": "adam", "epochs": 1, "batch_size": 32, "precision": "fp32"}})
    return run_experiment(cfg, tmp_path_factory.mktemp("msg") / "runs", progress="none").path


@pytest.fixture
def copy(small_run, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small_run, dst)
    return dst


# ---------------------------------------------------------------- checkpoints

def test_a_truncated_checkpoint_says_so_and_points_to_the_other_one(copy, tmp_path):
    best = copy / "checkpoints" / "best.pt"
    data = best.read_bytes()
    best.write_bytes(data[: len(data) // 2])
    proc = cli(["evaluate", copy, "--weights", "best"], tmp_path / "home")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert str(best) in line and "truncated" in line
    assert "--weights last" in line and f"cnnlab rerun {copy}" in line
    assert "weights_only" not in line and "Errno" not in line
    assert cli(["evaluate", copy, "--weights", "last"], tmp_path / "home").returncode == 0   # the way out works


def test_without_the_other_checkpoint_the_way_out_is_a_new_copy_or_rerun(copy):
    (copy / "checkpoints" / "best.pt").unlink()
    last = copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(last)
    msg = str(e.value)
    assert "truncated" in msg and "--weights" not in msg and "copy the run folder again" in msg


class Payload:
    """Something torch.save pickles as a class, which weights_only loading refuses."""


def test_a_foreign_pickle_is_not_a_cnnlab_checkpoint_and_never_gets_torch_advice(copy):
    last = copy / "checkpoints" / "last.pt"
    torch.save({"model": Payload()}, last)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(last)
    msg = str(e.value)
    assert str(last) in msg and "not a cnnlab checkpoint" in msg and "test_messages.Payload" in msg
    assert "weights_only" not in msg and "False" not in msg and "trust" not in msg
    assert "--weights best" in msg


def test_other_files_are_not_cnnlab_checkpoints(tmp_path):
    for name, write in (("state.pt", lambda p: torch.save({"w": torch.zeros(2)}, p)),     # a bare state dict
                        ("notes.pt", lambda p: p.write_text("hello")),
                        ("empty.pt", lambda p: p.write_bytes(b""))):
        p = tmp_path / name
        write(p)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: cannot load checkpoint: ")
        assert ("not a cnnlab checkpoint" in msg) if name != "empty.pt" else ("truncated" in msg)
        assert "checkpoints/best.pt or last.pt" in msg


# ---------------------------------------------------------------- skipped images

def _folder(root: Path, bad: int) -> Path:
    for split, n in (("train", 6), ("test", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / split / c / f"{i}.png")
    for i in range(bad):
        (root / "train" / "bee" / f"{i}.png").write_bytes(b"broken")
    return root


def test_skipped_images_are_one_summary_line_and_listed(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", bad=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(root), classes=0, skip_corrupt=True),
                          quiet=True)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and "skipped 3" in lines[0] and "skipped_images.txt" in lines[0]
    assert len(ds.x_train) == 9
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["0.png", "1.png", "2.png"]
    assert all("bee" in p and reason for p, reason in ds.skipped)
    run = RunFolder.create(tmp_path / "runs", "r")
    RunRecorder(run).write_skipped(ds.skipped)
    listed = (run.path / "skipped_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [p for p, _ in ds.skipped]
    RunRecorder(RunFolder.create(tmp_path / "runs", "clean")).write_skipped([])
    assert not list((tmp_path / "runs").glob("clean-*/skipped_images.txt"))


def test_without_skip_corrupt_an_unreadable_image_is_still_an_error(tmp_path):
    root = _folder(tmp_path / "imgs", bad=1)
    with pytest.raises(DataError, match=r"0\.png.*skip_corrupt"):
        load_dataset(DataConfig(source="imagefolder", data_dir=str(root), classes=0), quiet=True)


# ---------------------------------------------------------------- large JPEGs

def _old_pil_to_array(im: Image.Image, size: int) -> np.ndarray:
    """The decoding before draft mode: full decode, then the same resize and crop."""
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)


def _photo(path: Path, w: int, h: int) -> Path:
    """A smooth picture with some texture (a flat one would hide any difference)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([255 * xx / w, 255 * yy / h, 127 + 100 * np.sin(xx / 37) * np.cos(yy / 53)], -1)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.fixture
def decoded_sizes(monkeypatch) -> list:
    """The size of every image Pillow decodes (a spy on ImageFile.load): what decoding costs in memory."""
    sizes = []
    real = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            sizes.append(self.size)
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_a_huge_jpeg_is_decoded_at_reduced_size(tmp_path, decoded_sizes):
    path = _photo(tmp_path / "big.jpg", 4800, 3600)
    x = images_mod.load_image(path, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.uint8
    assert decoded_sizes == [(600, 450)]                    # 1/8 scale: 0.8 MB of pixels instead of 52 MB
    with Image.open(path) as im:
        full = _old_pil_to_array(im, 32)
    assert np.abs(x.astype(int) - full.astype(int)).mean() < 2.0     # the same picture


@pytest.mark.parametrize("w,h", [(150, 100), (191, 400), (64, 64), (33, 500)])
def test_images_that_need_no_reduction_decode_exactly_as_before(tmp_path, decoded_sizes, w, h):
    path = _photo(tmp_path / "small.jpg", w, h)
    x = images_mod.load_image(path, 32)
    assert decoded_sizes == [(w, h)]                        # decoded whole, as before
    with Image.open(path) as im:
        assert np.array_equal(x, _old_pil_to_array(im, 32))


def test_a_huge_jpeg_among_small_ones_is_resized_with_a_note_never_decoded_whole(tmp_path, decoded_sizes):
    # image_size = 0 keeps images as they are only when they share one size; mixed sizes are resized to
    # Keras's 256x256 with one line saying so, and the huge file is decoded at reduced size (its header first)
    root = _folder(tmp_path / "imgs", bad=0)
    _photo(root / "train" / "ant" / "9_big.jpg", 2400, 1800)
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(root), classes=0), quiet=True)
    assert ds.x_train.shape[1:] == (3, 256, 256)
    assert any("different sizes" in n and "256x256" in n and "image_size" in n for n in ds.notes), ds.notes
    assert (2400, 1800) not in decoded_sizes and (8, 8) in decoded_sizes
