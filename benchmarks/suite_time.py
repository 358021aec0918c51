"""Wall time of the practice's whole CIFAR suite: Keras reference vs cnnlab, same data, one run.

Keras: ../shared/reference/keras_practice.py DATA.npz (all 11 rows, as the seed wrote them).
cnnlab: `cnnlab suite practice --data cifar10s` on the same images (the stand-in in CIFAR python layout).
Prints each side's per-row test accuracy and seconds, and the wall-time ratio.

The full suite takes over two hours in Keras on a 2-core CPU. `--epochs N` cuts every row of both sides to
at most N epochs (Keras: its Model.fit capped from outside, the reference script unchanged; cnnlab:
`--set train.epochs=N`), so that one comparison takes minutes; each side's start-up, data loading, model
building and test evaluation still run in full, so a cut suite weighs fixed costs more than the full one.

Usage: python benchmarks/suite_time.py CIFAR10_PY_PARENT_DIR STANDIN.npz [--epochs N] [--jobs N] [--keras-jsonl KERAS_JSONL]
  CIFAR10_PY_PARENT_DIR holds cifar-10-batches-py/ (../shared/data/to_cifar_python.py writes it);
  STANDIN.npz is ../shared/data/make_standin.py's output for the same folder.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import KERAS_PY, REFERENCE, keras_available

# Runs the reference script unchanged, with keras.Model.fit capped at N epochs (its rows pass epochs=...).
KERAS_CAPPED = """
import runpy, sys, keras
cap, script = int(sys.argv[1]), sys.argv[2]
fit = keras.Model.fit
def capped(self, *a, **k):
    k["epochs"] = min(k.get("epochs", 1), cap)
    return fit(self, *a, **k)
keras.Model.fit = capped
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("npz")
    ap.add_argument("--keras-jsonl", help="reuse Keras rows measured earlier instead of running Keras")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, help="cut every row of both sides to at most this many epochs")
    ap.add_argument("--jobs", type=int, default=1, help="cnnlab suite --jobs: rows run side by side, cores split")
    a = ap.parse_args()
    script = str(REFERENCE / "keras_practice.py")
    keras_cmd = [KERAS_PY, script, a.npz] if not a.epochs else [KERAS_PY, "-c", KERAS_CAPPED, str(a.epochs), script, a.npz]
    cut = ["--set", f"train.epochs={a.epochs}"] if a.epochs else []

    if a.keras_jsonl:
        keras_rows = [json.loads(x) for x in Path(a.keras_jsonl).read_text().splitlines() if x.startswith("{")]
        keras_wall = sum(r["seconds"] for r in keras_rows)
    else:
        if not keras_available():
            sys.exit(f"Keras reference not found (KERAS_PYTHON={KERAS_PY}, reference {REFERENCE})")
        t0 = time.perf_counter()
        out = subprocess.run(keras_cmd, capture_output=True, text=True, check=True)
        keras_wall = time.perf_counter() - t0
        keras_rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]

    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnlab", "suite", "practice", "--data", "cifar10s", "--data-dir", a.data_dir,
                        "--runs-dir", runs, "--seed", str(a.seed), *cut, "--jobs", str(a.jobs), "-q"], check=False, stdout=subprocess.DEVNULL)
        cnnlab_wall = time.perf_counter() - t0
        ours = {}
        for res in Path(runs).rglob("results.json"):
            r = json.loads(res.read_text())
            ours[r["name"]] = r
    print(f"{'row':<8}{'Keras acc':>10}{'s':>8}{'cnnlab acc':>12}{'s':>8}")
    for k in keras_rows:
        o = ours.get(k["row"], {})
        print(f"{k['row']:<8}{k['test_acc']:>10.4f}{k['seconds']:>8.1f}{(o.get('test_accuracy') or float('nan')):>12.4f}"
              f"{o.get('seconds', float('nan')):>8.1f}")
    print(f"\n{'whole suite' if not a.epochs else f'suite cut to {a.epochs} epochs a row'}: Keras {keras_wall:.1f} s, cnnlab {cnnlab_wall:.1f} s (process wall time, data loading included): "
          f"cnnlab takes {cnnlab_wall / keras_wall:.2f} of Keras's time ({keras_wall / cnnlab_wall:.2f}x faster)")


if __name__ == "__main__":
    main()
