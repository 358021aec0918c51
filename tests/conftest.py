"""Shared fixtures: every test gets its own data, cache and home folders under tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Environment variables that would make a test read or write outside its tmp folder, or reach the network.
_ISOLATED = ("CNNLAB_DATA", "CNNLAB_CACHE", "XDG_CACHE_HOME", "CNNLAB_DOWNLOAD_MIRROR", "MPLCONFIGDIR",
             "MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Point every cnnlab folder at tmp_path so nothing touches the user's home or cache."""
    env = {
        "CNNLAB_DATA": str(tmp_path / "data"),
        "CNNLAB_CACHE": str(tmp_path / "cache"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for k in _ISOLATED:
        monkeypatch.delenv(k, raising=False)
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # Never reach the real download host from a test: a closed loopback port unless a test sets its own.
    monkeypatch.setenv("CNNLAB_DOWNLOAD_MIRROR", "http://127.0.0.1:9/")
    return env


def subprocess_env(home: Path, **extra: str) -> dict:
    """Environment for a `cnnlab` subprocess: isolated folders under `home`, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if k not in _ISOLATED and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({
        "CNNLAB_DATA": str(home / "data"),
        "CNNLAB_CACHE": str(home / "cache"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "MPLCONFIGDIR": str(home / "mpl"),
        "HOME": str(home),
        "NO_PROXY": "127.0.0.1,localhost",
        # one thread: the runs are tiny, and two threads on a shared 2-core machine stall for seconds
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


def run_cli(args: list[str], home: Path, cwd: Path | None = None, timeout: float = 300,
            **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m cnnlab ARGS` in a subprocess with an isolated environment."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or home, env=subprocess_env(home, **extra_env), timeout=timeout)


def cli(args: list, home: Path) -> subprocess.CompletedProcess:
    """`cnnlab ARGS` in this process (cnnlab.cli.main), with its exit status and output captured: the same
    command-line behaviour as `run_cli` without paying a fresh interpreter's torch import (several seconds).
    Tests of what only a real process shows (signals, exit codes of a killed child, worker processes, the
    installed entry point) use run_cli."""
    import contextlib
    import io
    import warnings

    import torch

    from cnnlab.cli import main
    out, err = io.StringIO(), io.StringIO()
    before, threads, pinned = Path.cwd(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    # One pinned thread, as run_cli's processes have: the same numbers, and no thread adaptation mid-test.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # Warnings as a fresh process shows them (each once, on stderr); pytest would otherwise collect them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            home.mkdir(parents=True, exist_ok=True)
            os.chdir(home)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        except SystemExit as e:            # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        finally:
            os.chdir(before)
            torch.set_num_threads(threads)
            if pinned is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = pinned
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(["cnnlab", *map(str, args)], code, out.getvalue(), err.getvalue() + shown)


def synthetic_row(name: str, lr: float, epochs: int, label: str | None = None) -> str:
    """A small, fast suite row: BaseNet + Adam on the synthetic source (optionally with a report label)."""
    text = f"""
name = "{name}"
seed = 0
[data]
source = "synthetic"
classes = 10
synthetic_train = 400
synthetic_test = 100
[model]
name = "basenet"
[train]
optimizer = "adam"
lr = {lr}
epochs = {epochs}
batch_size = 32
precision = "fp32"
"""
    return text + (f'[report]\nlabel = "{label}"\n' if label else "")


class LineReader:
    """Reads a child's output on a thread, so a test can wait for a line with a deadline (never forever)."""

    def __init__(self, stream):
        import queue
        import threading
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen = ""
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 240) -> str:
        """Returns everything read once a line starting with `prefix` arrived; fails at EOF or the deadline."""
        import queue
        import time
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout}s; got:\n{self.seen[-2000:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the process ended before a line starting with {prefix!r}:\n{self.seen[-2000:]}")
            self.seen += line
            if line.startswith(prefix):
                return self.seen


def wait_for_checkpoint(folder: Path, min_epoch: int, timeout: float = 240) -> Path:
    """The first last.pt under `folder` that holds at least `min_epoch` epochs (polled, with a deadline)."""
    import time

    import torch
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.rglob("checkpoints/last.pt"):
            try:
                if torch.load(path, weights_only=True, map_location="cpu")["epoch"] >= min_epoch:
                    return path
            except Exception:  # noqa: BLE001 - being replaced right now: look again
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch >= {min_epoch} under {folder} within {timeout}s")
