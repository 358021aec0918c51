"""Streamed vs in-memory training, and the decoded-image cache's build speed, on the real CIFAR-10.

    python benchmarks/stream_speed.py [--images DIR] [--steps 150] [--budget-mb 8]

1. The image folder: ../shared/data/cifar10-jpeg.tar.gz (60,000 JPEGs, train/ and test/) extracted to
   --images (default /tmp/cifar10-jpeg) when not there yet.
2. Cache build: cnnlab's decode of the whole folder into a fresh cache (all cores, the folder scan
   included), in images/s, against a bare Pillow decode loop on one core (Image.open -> RGB -> array,
   nothing else) over the same files; and the CPU time per image of the decoder processes.
3. Training: the `best` config's model and recipe (resnet9s width 16, batch 128, SGD Nesterov, crop + flip,
   featurewise normalization) for --steps steps, on a training split (steps x 128 random images of the
   50,000) read from the cache file once onto the device (in memory) and once streamed (budget --budget-mb,
   below the split's 56 MB), the file (147 MB) in the page cache. Each mode is timed 3 times, interleaved,
   median kept; the losses of the two modes must be equal (same batches, same random streams).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def image_folder(path: Path) -> Path:
    if not (path / "test").is_dir():
        print(f"extracting {TAR} -> {path}")
        with tarfile.open(TAR) as t:
            t.extractall(path, filter="data")
    return path


def bare_pillow(paths: list[Path]) -> float:
    """images/s of a one-core loop that only decodes (the floor of any decoder written in Python)."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            np.asarray(im.convert("RGB"))
    return len(paths) / (time.perf_counter() - t0)


def build_cache(folder: Path) -> tuple[float, int, float]:
    """cnnlab's cache build of train + test (a fresh cache folder, scanning the folders included): images/s,
    image count, and the CPU seconds per image of the decoder processes (their user + system time)."""
    from cnnlab.config import DataConfig
    from cnnlab.data import load_dataset
    os.environ["CNNLAB_CACHE"] = tempfile.mkdtemp(prefix="cnnlab-stream-bench-")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(source="imagefolder", data_dir=str(folder), classes=0), quiet=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(ds.x_train) + len(ds.x_test)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return n / seconds, n, cpu / n


def training(folder: Path, steps: int, budget_mb: int) -> dict:
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import load_config
    from cnnlab.configs import config_file
    from cnnlab.data import load_dataset
    from cnnlab.data.stream import Streamed, mb, place, rows_of
    from cnnlab.training.engine import Trainer
    from cnnlab.models import create_model
    from cnnlab.data.preprocess import Normalizer, Preprocess
    import dataclasses
    cfg = load_config(config_file("best"))
    data = dataclasses.replace(cfg.data, source="imagefolder", data_dir=str(folder), classes=0)
    ds = load_dataset(data, quiet=True)
    file = ds.files["x_train"]
    subprocess.run(["cat", file.path], stdout=subprocess.DEVNULL, check=True)     # into the page cache
    bs = cfg.train.batch_size
    tr = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))[:steps * bs].sort().values
    rows = rows_of(ds.x_train, file, tr)
    norm = Normalizer.fit(rows)
    train_cfg = dataclasses.replace(cfg.train, epochs=1)
    dev = torch.device("cpu")
    splits = {"memory": place({"train": (rows, ds.y_train[tr])}, dev, 2 ** 40, None)["train"],
              "streamed": place({"train": (rows_of(ds.x_train, file, tr), ds.y_train[tr])}, dev,
                                budget_mb * 2 ** 20, None)["train"]}
    assert isinstance(splits["streamed"], Streamed) and not isinstance(splits["memory"], Streamed)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(create_model(cfg.model.name, 10, **cfg.model.args), train_cfg, dev, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0),
                       Augmenter(cfg.augment, 32))

    warm = rows_of(ds.x_train, file, tr[:3 * bs])
    trainer().train_epoch(place({"w": (warm, ds.y_train[tr[:3 * bs]])}, dev, 2 ** 40, None)["w"])
    rates, loss = {"memory": [], "streamed": []}, {}
    for mode in ("memory", "streamed", "streamed", "memory", "memory", "streamed"):    # drift cancels out
        t = trainer()
        t0 = time.perf_counter()
        logs = t.train_epoch(splits[mode])
        rates[mode].append(steps * bs / (time.perf_counter() - t0))
        loss[mode] = logs["loss"]
        print(f"  {mode:8s} {rates[mode][-1]:7.0f} img/s  loss {logs['loss']:.6f}")
    return {"memory": float(np.median(rates["memory"])), "streamed": float(np.median(rates["streamed"])),
            "same_loss": loss["memory"] == loss["streamed"],
            "data": mb(len(ds.x_train) * file.row_bytes), "budget": mb(budget_mb * 2 ** 20),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="/tmp/cifar10-jpeg")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--budget-mb", type=int, default=8)
    a = ap.parse_args()
    folder = image_folder(Path(a.images))
    paths = sorted(folder.rglob("*.jpg"))
    print(f"{len(paths)} JPEGs in {folder}; {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"load average {os.getloadavg()[0]:.2f} (this machine may be shared: numbers need an idle one)")
    bare = max(bare_pillow(paths[k::36]) for k in range(3))
    print(f"bare Pillow decode loop, 1 core: {bare:7.0f} img/s (best of 3 x {len(paths[::36])} images, "
          f"{1e6 / bare:.0f} us each)")
    rate, n, cpu = build_cache(folder)
    print(f"cnnlab cache build, all cores:   {rate:7.0f} img/s ({n} images, {n / rate:.1f} s): "
          f"{rate / bare:.2f}x the bare loop; decoder processes {cpu * 1e6:.0f} us CPU per image")
    print(f"training, best recipe (resnet9s), {a.steps} steps of 128:")
    r = training(folder, a.steps, a.budget_mb)
    print(f"median of 3: in memory {r['memory']:.0f} img/s, streamed {r['streamed']:.0f} img/s "
          f"(budget {r['budget']} < {r['data']} of training images): streamed/in-memory "
          f"{r['streamed'] / r['memory']:.3f}; same loss: {r['same_loss']}; {r['threads']} threads")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
