"""Wall time of the practice suite one row at a time against `--jobs N` rows side by side, same run.

    python benchmarks/suite_jobs.py CIFAR10_PY_PARENT_DIR [--jobs 2] [--epochs 3] [--repeat 1]

Both sides run `cnnlab suite practice --data cifar10s` (the 11 rows on the seed-sized real CIFAR-10 stand-in;
CIFAR10_PY_PARENT_DIR holds cifar-10-batches-py/, see benchmarks/README.md), every row cut to --epochs
epochs so that one comparison takes minutes, not the hour the full suite takes on 2 cores. Each side is a
fresh process, timed from start to exit (data loading and worker start-up included). Prints each row's test
accuracy on both sides (same seeds: equal up to the float summation order of a different thread count)
and the wall-time ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def suite(data_dir: str, jobs: int, epochs: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cnnlab", "suite", "practice", "--data", "cifar10s",
                               "--data-dir", data_dir, "--runs-dir", runs, "--set", f"train.epochs={epochs}",
                               "--jobs", str(jobs), "-q"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"cnnlab suite --jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        rows = {}
        for res in Path(runs).rglob("results.json"):
            r = json.loads(res.read_text())
            rows[r["name"]] = (r.get("test_accuracy"), r.get("seconds"))
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two sides this many times; medians")
    a = ap.parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} (needs an otherwise idle machine)")
    walls: dict[int, list[float]] = {1: [], a.jobs: []}
    rows = {}
    for _ in range(a.repeat):
        for jobs in (1, a.jobs):
            wall, rows[jobs] = suite(a.data_dir, jobs, a.epochs)
            walls[jobs].append(wall)
            print(f"  --jobs {jobs}: {wall:.1f} s")
    med = {j: sorted(w)[len(w) // 2] for j, w in walls.items()}
    print(f"\n{'row':<10}{'acc, 1 at a time':>18}{f'acc, --jobs {a.jobs}':>16}")
    for name in rows[1]:
        print(f"{name:<10}{rows[1][name][0]:>18.4f}{rows[a.jobs][name][0]:>16.4f}")
    print(f"\npractice suite, {a.epochs} epochs a row: one at a time {med[1]:.1f} s, --jobs {a.jobs} {med[a.jobs]:.1f} s "
          f"(median of {a.repeat}): {med[1] / med[a.jobs]:.2f}x")


if __name__ == "__main__":
    main()
