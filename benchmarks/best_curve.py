"""The `best` recipe on the seed-sized CIFAR-10 stand-in: accuracy against seconds, and what test-time flip
adds and costs.

    python benchmarks/best_curve.py --data-dir DIR [--seeds 3] [--runs RUN_DIR ...] [--timing-epochs 3]

1. Runs (or, with --runs, reads) `cnnlab run best --data cifar10s` with [augment] test_flip = true, seeds
   0..N-1. test_flip does not change training, so each run's weights also give the plain recipe's test
   accuracy: the script scores the test split again with the bare network (no mirror).
2. Timing, both recipes in this process, alternated: --timing-epochs epochs each, plain then flip, twice;
   seconds per epoch (training + validation) and the ratio. (A short run's schedule differs; its epoch costs
   the same.)
3. Writes benchmarks/best_curve.png: validation accuracy (with flip) against training seconds, each seed and
   their mean, the target 0.85 and the mean test accuracies. Prints a markdown table.

DIR holds cifar-10-batches-py/ (../shared/data/to_cifar_python.py writes it).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

import cnnlab
from cnnlab.api import load_model
from cnnlab.config import load_config, read_toml
from cnnlab.configs import config_file, data_preset
from cnnlab.data import load_dataset
from cnnlab.plots import subplots

HERE = Path(__file__).parent


def test_accuracies(run: Path, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(plain, flip) test accuracy of a test_flip run's weights."""
    model, pre, _, _ = load_model(run)
    bare = getattr(model, "net", model)
    with torch.no_grad():
        a = torch.cat([bare(pre(x[i:i + 500])) for i in range(0, len(x), 500)])
        b = torch.cat([bare(pre(x[i:i + 500]).flip(-1)) for i in range(0, len(x), 500)])
    return (a.argmax(1) == y).float().mean().item(), ((a + b).argmax(1) == y).float().mean().item()


def epoch_seconds(data_dir: str, runs_dir: str, epochs: int, flip: bool) -> float:
    r = cnnlab.run("best", data="cifar10s", data_dir=data_dir, runs_dir=runs_dir, progress="none",
                   train={"epochs": epochs, "warmup_epochs": 1}, augment={"test_flip": flip})
    return statistics.mean(h["seconds"] for h in r.history)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", nargs="*", help="test_flip runs of best made earlier (skips training them)")
    ap.add_argument("--runs-dir", default="/tmp/best-curve-runs")
    ap.add_argument("--timing-epochs", type=int, default=3)
    a = ap.parse_args()

    runs = [Path(r) for r in a.runs] if a.runs else [
        cnnlab.run("best", data="cifar10s", data_dir=a.data_dir, runs_dir=a.runs_dir, seed=s,
                   augment={"test_flip": True}).path for s in range(a.seeds)]
    cfg = load_config(config_file("best"), [("data.data_dir", a.data_dir)], (read_toml(data_preset("cifar10s")), "cifar10s"))
    ds = load_dataset(cfg.data, quiet=True)
    rows = []
    for run in runs:
        hist = json.loads((run / "history.json").read_text())
        plain, flip = test_accuracies(run, ds.x_test, ds.y_test)
        res = json.loads((run / "results.json").read_text())
        assert abs(flip - res["test_accuracy"]) < 1e-6, (flip, res["test_accuracy"])   # as the run scored it
        rows.append({"run": str(run), "seed": res["seed"], "plain": plain, "flip": flip,
                     "seconds": sum(h["seconds"] for h in hist), "history": hist})
        print(f"seed {res['seed']}: test accuracy {plain:.4f} plain, {flip:.4f} with test flip; "
              f"{rows[-1]['seconds']:.0f} s of training", flush=True)

    timing = {False: [], True: []}
    if a.timing_epochs:
        for _ in range(2):
            for flip in (False, True):
                timing[flip].append(epoch_seconds(a.data_dir, a.runs_dir, a.timing_epochs, flip))
                print(f"  {'flip ' if flip else 'plain'}: {timing[flip][-1]:.2f} s/epoch", flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("plain", "flip", "seconds")}
    std = {k: statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0 for k in ("plain", "flip")}
    print("\n| seed | test accuracy, plain | with test flip | training seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['plain']:.4f} | {r['flip']:.4f} | {r['seconds']:.0f} |")
    print(f"| mean ± std | {mean['plain']:.4f} ± {std['plain']:.4f} | {mean['flip']:.4f} ± {std['flip']:.4f} | "
          f"{mean['seconds']:.0f} |")
    if a.timing_epochs:
        p, f = statistics.mean(timing[False]), statistics.mean(timing[True])
        print(f"\nseconds per epoch (training + validation), idle, mean of 2 x {a.timing_epochs} epochs: plain {p:.2f}, "
              f"test flip {f:.2f}: {f / p:.3f}x")

    fig, ax = subplots(figsize=(7, 4.5))
    curves = []
    for r in rows:
        t = np.cumsum([h["seconds"] for h in r["history"]])
        acc = [h["val_accuracy"] for h in r["history"]]
        curves.append((t, acc))
        ax.plot(t, acc, color="C0", alpha=0.3, linewidth=1)
    # x: the median over seeds of each epoch's cumulative seconds (one seed slowed by something else on the
    # machine does not move the curve)
    t_mid = np.median([c[0] for c in curves], axis=0)
    ax.plot(t_mid, np.mean([c[1] for c in curves], axis=0), color="C0", marker=".",
            label=f"validation accuracy, mean of {len(rows)} seeds (test flip)")
    ax.axhline(mean["flip"], color="C1", linestyle="--", label=f"test accuracy with flip, mean {mean['flip']:.4f}")
    ax.axhline(mean["plain"], color="C2", linestyle=":", label=f"test accuracy plain, mean {mean['plain']:.4f}")
    ax.axhline(0.85, color="gray", linestyle="-.", label="issue target 0.85")
    ax.set_xlabel("training seconds (validation included), 2-core CPU")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.3, 0.9)
    ax.set_title("cnnlab best (resnet9s width 16, 30 epochs) on cifar10s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(HERE / "best_curve.png", dpi=110, bbox_inches="tight")
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "history"} for r in rows], "timing": timing}))


if __name__ == "__main__":
    main()
