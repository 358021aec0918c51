"""Data sets larger than memory: the memory-mapped decoded-image cache (a parallel build that resumes after a
kill, invalidation of changed images only) and streamed splits (the in-memory run's results bit for bit,
resident memory within the budget, each torchrun process reading only its shard)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, subprocess_env
from cnnlab.config import DataConfig, from_dict
from cnnlab.data import images as images_mod
from cnnlab.data import load_dataset, split_train_val, store
from cnnlab.data.stream import Rows, RowFile, memory_budget, prefetch
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment

K, SIZE = 4, 32                       # classes; images are SIZE x SIZE (3 KB each decoded)
N_TRAIN, N_TEST = 1500, 200           # 4.4 MB of training images: 4x a 1 MB budget


def write_folder(root: Path, n_train: int, n_test: int, seed: int = 0, noise: int = 64) -> Path:
    """root/{train,test}/c<k>/<i>.bmp: noise plus a class-dependent level in one channel (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, noise, (n, SIZE, SIZE, 3), dtype=np.uint8)
        for k in range(K):
            x[k::K, :, :, k % 3] += np.uint8(40 * (k + 1))
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(4) as ex:           # thousands of small files: creating them is the cost
            list(ex.map(lambda i: write_bmp(root / split / f"c{i % K}" / f"{i:05d}.bmp", x[i]), range(n)))
    return root


def write_bmp(path: Path, rgb: np.ndarray) -> None:
    """A 24-bit BMP without Pillow's per-file overhead (rows bottom-up, BGR; 32 * 3 bytes need no padding)."""
    h, w, _ = rgb.shape
    pixels = rgb[::-1, :, ::-1].tobytes()
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    path.write_bytes(header + info + pixels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imgs"), N_TRAIN, N_TEST)


@pytest.fixture
def pinned_threads(monkeypatch):
    """One compute thread, not adapted to the machine's load: bitwise comparisons between runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_figures(monkeypatch):
    monkeypatch.setattr("cnnlab.records.evaluation.write_evaluation", lambda *a, **k: None)
    monkeypatch.setattr("cnnlab.experiments.run.plot_curves", lambda *a, **k: None)


def config(folder: Path, budget: int, name: str = "s", **train) -> dict:
    return {"name": name, "seed": 3,
            "data": {"source": "imagefolder", "data_dir": str(folder), "classes": 0, "memory_budget_mb": budget},
            "model": {"name": "basenet"},
            "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 2, "batch_size": 64,
                      "precision": "fp32", "normalize": "featurewise", **train},
            "augment": {"crop_padding": 2, "zoom": 0.1, "hflip": True}}


def compare(a, b) -> None:
    """Same history (but the seconds) and the same test metrics, exactly."""
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    for k in ("test_loss", "test_accuracy", "test_top5", "test_macro_f1"):
        assert getattr(a.results, k) == getattr(b.results, k), k


# ---------------------------------------------------------------- streamed training

def test_streamed_run_is_the_in_memory_run_bit_for_bit(folder, tmp_path, capsys, pinned_threads, no_figures):
    memory = run_experiment(from_dict(config(folder, 64)), tmp_path / "runs", progress="line")
    assert "streaming" not in capsys.readouterr().out
    streamed = run_experiment(from_dict(config(folder, 1)), tmp_path / "runs", progress="line")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data: streaming"))
    assert line.startswith("data: streaming train (3.9 MB)") and "memory budget of 1.0 MB" in line
    compare(memory, streamed)
    assert memory.results.test_accuracy > 0.5            # it learnt something: the comparison is not vacuous


def test_streamed_frozen_features_match_in_memory(folder, tmp_path, pinned_threads, no_figures):
    """Extraction reads the images batch by batch; the feature cache is a memory-mapped .npy, and a feature
    split over the budget (12 KB a row here) is streamed like images."""
    raw = config(folder, 64)
    raw["model"] = {"name": "test_stream:pixels", "head": []}
    raw["train"].update(freeze_backbone=True, optimizer="adam", lr=1e-3, normalize="auto")
    raw["augment"] = {}
    memory = run_experiment(from_dict(raw), tmp_path / "runs", progress="none")
    assert memory.results.extra["features_from_cache"] is False
    cached = list((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(cached) == 2 and all(np.load(p, mmap_mode="r").shape[1] == 3 * SIZE * SIZE for p in cached)
    raw["data"]["memory_budget_mb"] = 1
    streamed = run_experiment(from_dict(raw), tmp_path / "runs", progress="none")
    assert streamed.results.extra["features_from_cache"] is True
    compare(memory, streamed)


class Pixels(torch.nn.Module):
    """A 'backbone' whose features are the pixels themselves (3072 of them)."""
    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, SIZE, SIZE)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def pixels() -> torch.nn.Module:
    return Pixels()


RSS_SCRIPT = """
import json, sys
import cnnlab.records.evaluation, cnnlab.experiments.run
from cnnlab.config import from_dict
cnnlab.records.evaluation.write_evaluation = cnnlab.experiments.run.plot_curves = lambda *a, **k: None

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

raw = json.loads(sys.argv[1])
warm = json.loads(sys.argv[1])
warm["data"]["max_train_per_class"] = 300                # every code path once, on a few images
cnnlab.experiments.run.run_experiment(from_dict(warm), sys.argv[2], progress="none")
open("/proc/self/clear_refs", "w").write("5")              # resets the peak (VmHWM) to the current RSS
base = status("VmRSS")
cnnlab.experiments.run.run_experiment(from_dict(raw), sys.argv[2], progress="none")
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""
# Beyond the budget: the training step's working memory (batches of 64: activations, gradients, the two
# prefetched batches), which the warm-up's freed pages do not cover.
OVERHEAD_MB = 16


def peak_growth(raw: dict, tmp_path: Path) -> float:
    """MB the process's peak resident memory rises during the run, above where it was after a warm-up run."""
    env = subprocess_env(tmp_path / "home", CNNLAB_CACHE=os.environ["CNNLAB_CACHE"])
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(raw), str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return (m["peak"] - m["base"]) / 2 ** 20


def test_streamed_peak_memory_stays_within_the_budget(tmp_path):
    """24 MB of training images, a budget of 6 MB: the streamed run's resident memory rises by less than the
    budget plus a stated overhead (OVERHEAD_MB); the in-memory run's by at least the data (so the measure can
    tell the two apart)."""
    big = write_folder(tmp_path / "big", 9000, 40)
    raw = config(big, 6, epochs=1, batch_size=64, eval_batch_size=64)
    raw["train"]["normalize"] = "none"
    raw["augment"] = {}
    load_dataset(DataConfig(**raw["data"]), quiet=True)                      # the cache, built beforehand
    streamed = peak_growth(raw, tmp_path)
    raw["data"]["memory_budget_mb"] = 1024
    in_memory = peak_growth(raw, tmp_path)
    data_mb = 9000 * 0.9 * 3 * SIZE * SIZE / 2 ** 20
    assert streamed < 6 + OVERHEAD_MB, (streamed, in_memory)
    assert in_memory > data_mb, (streamed, in_memory)
    print(f"peak growth: streamed {streamed:.1f} MB, in memory {in_memory:.1f} MB")


# ---------------------------------------------------------------- torchrun: each process reads its shard

TRACE = """
import atexit, json, os, sys
from cnnlab.data import stream
reads, real = [], stream.RowFile.read

def read(self, rows, out):
    reads.append([self.path, rows.tolist()])
    return real(self, rows, out)

stream.RowFile.read = read
atexit.register(lambda: open(f"rows-{os.environ['RANK']}.json", "w").write(json.dumps(reads)))
from cnnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_processes_read_disjoint_shards_and_match_one_process(folder, tmp_path):
    from test_ddp_tracking import ACC_ATOL, LOSS_RTOL, torchrun
    raw = config(folder, 1)
    # as the existing DDP test: plain SGD (momentum would amplify the float-order differences of DDP's
    # sharded gradient sums within two epochs); no featurewise statistics (they read the split once more)
    raw["train"].update(normalize="none", momentum=0.0, lr=0.02)
    import tomli_w
    cfg = tmp_path / "s.toml"
    cfg.write_text(tomli_w.dumps(raw))
    single = run_cli(["run", cfg, "--runs-dir", tmp_path / "single", "-q", "--set", "data.memory_budget_mb=64"],
                     tmp_path / "home")
    assert single.returncode == 0, single.stderr
    script = tmp_path / "trace.py"
    script.write_text(TRACE)
    torchrun(["run", cfg, "--runs-dir", tmp_path / "ddp", "-q"], tmp_path, script=script)

    # Rows of the training split each process read while training (the cache file holds train + val).
    ds = load_dataset(DataConfig(**raw["data"]), quiet=True)
    tr, _ = split_train_val(ds.y_train, 0.1, "stratified", raw["seed"])
    train_file = ds.files["x_train"].path
    counts = []
    for rank in (0, 1):
        reads = json.loads((tmp_path / f"rows-{rank}.json").read_text())
        rows = [r for path, rs in reads if Path(path).name == Path(train_file).name for r in rs]
        counts.append(np.bincount(rows, minlength=len(ds.y_train))[tr.numpy()])
    epochs, bs, n = raw["train"]["epochs"], raw["train"]["batch_size"], len(tr)
    sizes = [min(bs, n - i) for i in range(0, n, bs)]
    assert counts[0].sum() == epochs * sum((s + 1) // 2 for s in sizes)     # rank 0: the first half of each batch
    assert counts[1].sum() == epochs * sum(s // 2 for s in sizes)           # rank 1: the rest
    assert ((counts[0] + counts[1]) == epochs).all()       # together: every training image once an epoch

    h1 = json.loads(next((tmp_path / "single").glob("*/history.json")).read_text())
    h2 = json.loads(next((tmp_path / "ddp").glob("*/history.json")).read_text())
    for a, b in zip(h1, h2, strict=True):
        for k in ("loss", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL), (k, a, b)
        for k in ("accuracy", "val_accuracy"):
            assert abs(a[k] - b[k]) <= ACC_ATOL, (k, a, b)
    r1 = json.loads(next((tmp_path / "single").glob("*/results.json")).read_text())
    r2 = json.loads(next((tmp_path / "ddp").glob("*/results.json")).read_text())
    assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=LOSS_RTOL)
    assert abs(r2["test_accuracy"] - r1["test_accuracy"]) <= ACC_ATOL


# ---------------------------------------------------------------- the decoded-image cache

def paths_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.bmp"))


def counting(monkeypatch) -> list:
    calls, real = [], images_mod.read_image
    monkeypatch.setattr(images_mod, "read_image", lambda p, s: calls.append(p) or real(p, s))
    return calls


KILLED_BUILD = """
import sys, time
from pathlib import Path
from cnnlab.data import images, store
store.CHUNK, store.TASK = 32, 8
real = images.read_image
images.read_image = lambda p, s: time.sleep(0.01) or real(p, s)
store.cached_images(sorted(Path(sys.argv[1]).rglob("*.bmp")), 16, False, "killed", quiet=True)
"""


def test_a_killed_build_continues_where_it_stopped(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs", 400, 0)
    paths = paths_of(root)
    env = subprocess_env(tmp_path / "home", CNNLAB_CACHE=os.environ["CNNLAB_CACHE"])
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root)], env=env)
    base = store.cache_folder() / store.key(paths, 16, "killed")
    part = base.with_name(base.name + ".part.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(json.loads(part.read_text())["done"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = json.loads(part.read_text())["done"]
    assert 3 <= len(done) < 400 // 32, done
    monkeypatch.setattr(store, "CHUNK", 32)
    calls = counting(monkeypatch)
    x, keep = store.cached_images(paths, 16, False, "killed", quiet=True)
    left = 400 - sum(min(32, 400 - 32 * c) for c in done)
    assert len(calls) == left                                # only the chunks the killed build had not finished
    assert not part.exists() and keep.all()
    fresh, _ = images_mod.decode(paths, 16, False, "fresh", quiet=True)
    assert np.array_equal(np.asarray(x), fresh)


def test_a_changed_image_decodes_its_own_row_only(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs", 40, 0)
    paths = paths_of(root)
    store.cached_images(paths, 0, False, "t", quiet=True)
    calls = counting(monkeypatch)
    changed = paths[7]
    Image.fromarray(np.full((SIZE, SIZE, 3), 9, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    x, _ = store.cached_images(paths, 0, False, "t", quiet=True)
    assert calls == [changed] and (np.asarray(x[7]) == 9).all()
    store.cached_images(paths, 0, False, "t", quiet=True)
    assert calls == [changed]                                # recorded: not decoded again


def test_unreadable_images_are_skipped_from_the_mapped_rows(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs", 20, 0)
    paths = paths_of(root)
    paths[3].write_bytes(b"not an image")
    x, keep = store.cached_images(paths, 0, True, "t", quiet=True)
    assert paths[3].name in capsys.readouterr().err                  # one summary line (no load_dataset here)
    assert keep.sum() == 19 and not keep[3] and isinstance(x, np.memmap) and len(x) == 19
    fresh, _ = images_mod.decode([p for i, p in enumerate(paths) if i != 3], 0, False, "t", quiet=True)
    assert np.array_equal(np.asarray(x), fresh)


def test_a_large_build_uses_worker_processes(tmp_path, monkeypatch):
    """Past PROCESSES_FROM images the build forks one decoder per core; the result is the same."""
    root = write_folder(tmp_path / "imgs", 120, 0)
    paths = paths_of(root)
    monkeypatch.setattr(store, "PROCESSES_FROM", 50)
    x, keep = store.cached_images(paths, 16, False, "p", quiet=True)
    fresh, _ = images_mod.decode(paths, 16, False, "p", quiet=True)
    assert keep.all() and np.array_equal(np.asarray(x), fresh)


# ---------------------------------------------------------------- the parts

def test_row_file_gathers_rows_in_any_order(tmp_path):
    a = np.arange(50 * 6, dtype=np.float32).reshape(50, 2, 3)
    np.save(tmp_path / "a.npy", a)
    rows = Rows(RowFile.of(np.load(tmp_path / "a.npy", mmap_mode="r")), np.arange(10, 50))
    pos = np.array([5, 1, 2, 3, 39, 0, 17])
    assert np.array_equal(rows.gather(pos).numpy(), a[10:][pos])
    assert np.array_equal(rows[3:9].numpy(), a[13:19]) and rows.nbytes == 40 * 24


def test_prefetch_keeps_order_and_raises_the_workers_error():
    assert list(prefetch(lambda i: i * i, range(10))) == [i * i for i in range(10)]

    def boom(i):
        if i == 3:
            raise ValueError("bad batch")
        return i

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(boom, range(10)))
    gen = prefetch(lambda i: i, range(100))
    assert next(gen) == 0
    gen.close()                                              # stops the thread (the test would hang otherwise)


def test_memory_budget_setting_and_default():
    assert memory_budget(5, torch.device("cpu")) == 5 * 2 ** 20
    assert 0 < memory_budget(0, torch.device("cpu")) < 2 ** 50
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        from_dict({"data": {"memory_budget_mb": -1}})
