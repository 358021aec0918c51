"""Shared helpers for the benchmarks: the Keras reference interpreter and cnnlab timing runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE = Path(os.environ.get("CNNLAB_REFERENCE", HERE.parent.parent / "shared" / "reference"))
KERAS_PY = os.environ.get("KERAS_PYTHON", "/tmp/kerasref/bin/python")


def keras_available() -> bool:
    return Path(KERAS_PY).is_file() and REFERENCE.is_dir()


def run_keras(script: str, *args: str) -> list[dict]:
    """Run a reference script with the Keras interpreter; returns its JSON lines."""
    if not keras_available():
        sys.exit(f"Keras reference not found: set KERAS_PYTHON (now {KERAS_PY}) and CNNLAB_REFERENCE (now {REFERENCE}); "
                 f"see {REFERENCE}/README.md for the set-up")
    out = subprocess.run([KERAS_PY, str(REFERENCE / script), *args], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def random_npz(path: Path, n_train: int, n_test: int, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(n_train) % classes, x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % classes)
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
