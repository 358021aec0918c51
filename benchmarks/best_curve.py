"""The `best` recipe on the seed-sized CIFAR-10 stand-in: accuracy against seconds, what its test-time
augmentation adds, and its time against the recipe the speed issue started from.

    python benchmarks/best_curve.py --data-dir DIR [--seeds 3] [--runs RUN_DIR ...] [--timing-epochs 3]

1. Runs (or, with --runs, reads) `cnnlab run best --data cifar10s`, seeds 0..N-1. Test-time augmentation does
   not change training, so each run's weights also give the test accuracy without it, and with the flip
   alone: the script scores the test split with the bare network, with image + mirror, and with the run's
   6 views (image, mirror, both moved diagonally by 1 pixel), which must equal the run's own test accuracy.
2. Timing, in this process, alternated: --timing-epochs epochs of the issue's starting recipe (`best` as it was
   then: resnet9s, no test-time views) and of today's `best`, twice; seconds per epoch (training + validation), and the
   one pass of the 6-view test scoring at the end of a run against the bare network's. (A short run's
   schedule differs; its epoch costs the same.)
3. Writes benchmarks/best_curve.png: validation accuracy against training seconds, each seed and their
   mean, the target 0.85 and the mean test accuracies. Prints a markdown table.

DIR holds cifar-10-batches-py/ (../shared/data/to_cifar_python.py writes it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import cnnlab
from cnnlab.api import load_model
from cnnlab.config import load_config, read_toml
from cnnlab.configs import config_file, data_preset
from cnnlab.data import load_dataset
from cnnlab.models.build import TestTimeAverage
from cnnlab.records.plots import subplots

HERE = Path(__file__).parent


def test_accuracies(run: Path, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy of a run's weights: bare, image + mirror, and the run's own test-time views."""
    model, pre, _, _ = load_model(run)
    bare = getattr(model, "net", model)
    flip = TestTimeAverage(bare, flip=True).eval()
    out = {}
    with torch.no_grad():
        for name, m in (("plain", bare), ("flip", flip), ("tta", model)):
            logits = torch.cat([m(pre(x[i:i + 500])) for i in range(0, len(x), 500)])
            out[name] = (logits.argmax(1) == y).float().mean().item()
    return out


def scoring_seconds(run: Path, x: torch.Tensor) -> tuple[float, float]:
    """Seconds to score the test split with the bare network and with the run's test-time views (best of 2)."""
    model, pre, _, _ = load_model(run)
    bare = getattr(model, "net", model)
    times = []
    for m in (bare, model):
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(x), 500):
                    m(pre(x[i:i + 500]).contiguous(memory_format=torch.channels_last))
            best = min(best, time.perf_counter() - t)
        times.append(best)
    return times[0], times[1]


# The recipe the speed issue measured (`best` as it was then: resnet9s width 16, label smoothing 0.1, no
# test-time views): the time budget.
START = {"model": {"name": "resnet9s", "args": {"width": 16}}, "train": {"label_smoothing": 0.1},
         "augment": {"test_flip": False, "test_shift": 0}}


def epoch_seconds(data_dir: str, runs_dir: str, epochs: int, start: bool) -> float:
    over = {k: dict(v) for k, v in START.items()} if start else {}
    over["train"] = {**over.get("train", {}), "epochs": epochs, "warmup_epochs": 1}
    r = cnnlab.run("best", data="cifar10s", data_dir=data_dir, runs_dir=runs_dir, progress="none", **over)
    return statistics.mean(h["seconds"] for h in r.history)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", nargs="*", help="runs of best made earlier (skips training them)")
    ap.add_argument("--runs-dir", default="/tmp/best-curve-runs")
    ap.add_argument("--timing-epochs", type=int, default=3)
    a = ap.parse_args()

    runs = [Path(r) for r in a.runs] if a.runs else [
        cnnlab.run("best", data="cifar10s", data_dir=a.data_dir, runs_dir=a.runs_dir, seed=s).path
        for s in range(a.seeds)]
    cfg = load_config(config_file("best"), [("data.data_dir", a.data_dir)], (read_toml(data_preset("cifar10s")), "cifar10s"))
    ds = load_dataset(cfg.data, quiet=True)
    rows = []
    for run in runs:
        hist = json.loads((run / "history.json").read_text())
        acc = test_accuracies(run, ds.x_test, ds.y_test)
        res = json.loads((run / "results.json").read_text())
        assert abs(acc["tta"] - res["test_accuracy"]) < 1e-6, (acc, res["test_accuracy"])   # as the run scored it
        rows.append({"run": str(run), "seed": res["seed"], **acc, "seconds": sum(h["seconds"] for h in hist),
                     "history": hist})
        print(f"seed {res['seed']}: test accuracy {acc['plain']:.4f} bare, {acc['flip']:.4f} with the mirror, "
              f"{acc['tta']:.4f} with the 6 views; {rows[-1]['seconds']:.0f} s of training", flush=True)

    timing = {"start": [], "best": []}
    if a.timing_epochs:
        for _ in range(2):
            for key in timing:
                timing[key].append(epoch_seconds(a.data_dir, a.runs_dir, a.timing_epochs, key == "start"))
                print(f"  {key}: {timing[key][-1]:.2f} s/epoch", flush=True)
    bare_s, tta_s = scoring_seconds(runs[0], ds.x_test)
    keys = ("plain", "flip", "tta")
    mean = {k: statistics.mean(r[k] for r in rows) for k in (*keys, "seconds")}
    std = {k: statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0 for k in keys}
    print("\n| seed | test accuracy, bare network | image + mirror | 6 views (`best`) | training seconds |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['plain']:.4f} | {r['flip']:.4f} | {r['tta']:.4f} | {r['seconds']:.0f} |")
    print("| mean ± std | " + " | ".join(f"{mean[k]:.4f} ± {std[k]:.4f}" for k in keys) + f" | {mean['seconds']:.0f} |")
    print(f"\nscoring the {len(ds.x_test)} test images once: bare {bare_s:.2f} s, 6 views {tta_s:.2f} s")
    if a.timing_epochs:
        p, f = statistics.mean(timing["start"]), statistics.mean(timing["best"])
        print(f"seconds per epoch (training + validation), idle, mean of 2 x {a.timing_epochs} epochs: the issue's "
              f"starting recipe {p:.2f}, best {f:.2f}: {f / p:.3f}x; a {cfg.train.epochs}-epoch run: "
              f"{p * cfg.train.epochs:.0f} s against {f * cfg.train.epochs + tta_s - bare_s:.0f} s with the 6-view test pass")

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
            label=f"validation accuracy (bare network), mean of {len(rows)} seeds")
    ax.axhline(mean["tta"], color="C1", linestyle="--", label=f"test accuracy, 6 views (best), mean {mean['tta']:.4f}")
    ax.axhline(mean["plain"], color="C2", linestyle=":", label=f"test accuracy, bare network, mean {mean['plain']:.4f}")
    ax.axhline(0.85, color="gray", linestyle="-.", label="issue target 0.85")
    ax.set_xlabel("training seconds (validation included), 2-core CPU")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.3, 0.9)
    ax.set_title(f"cnnlab best ({cfg.model.name}, {cfg.train.epochs} epochs) on cifar10s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(HERE / "best_curve.png", dpi=110, bbox_inches="tight")
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "history"} for r in rows], "timing": timing,
                      "scoring_seconds": [bare_s, tta_s]}))


if __name__ == "__main__":
    main()
