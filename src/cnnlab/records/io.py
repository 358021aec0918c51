"""Files that are never half-written: atomic writes, JSON, and checkpoints loaded safely.

Every file cnnlab writes goes through `atomic_write` (a temporary file beside the target, fsync, rename), so a
killed process leaves the previous file or none. Checkpoints are read with `weights_only=True`: tensors and
plain containers only, never arbitrary code.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from cnnlab.errors import CheckpointError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# mkstemp makes 0600 files; a finished file gets the mode a plain open() would have given it, so a lab
# group sharing a runs folder (or a web server showing reports) can read it.
_FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """Write to a temporary file beside `path`, fsync, then rename over it: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_checkpoint(path: Path, obj: dict) -> None:
    with _signals_held(), atomic_write(path, "wb") as f:
        torch.save(obj, f)


# Signals whose Python handlers raise: Ctrl-C (KeyboardInterrupt), and the warning Slurm sends before a time limit
# or a preemption (submitit's handler requeues the task, then calls sys.exit).
_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


@contextmanager
def _signals_held():
    """Signals that arrive during a checkpoint write are handled once it is written.

    An exception raised by a handler inside torch.save (its pickler runs Python code) leaves torch's zip writer
    half-way, and closing it raises its own RuntimeError ("unexpected pos ...") in place of the SystemExit or
    KeyboardInterrupt: a requeued Slurm task then reported itself as failed. Held, the handler runs after the
    rename, with a complete checkpoint on disk. Python handlers run in the main thread only: elsewhere, as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    previous = {}
    for signum in _HELD:
        handler = signal.getsignal(signum)
        if callable(handler):           # a Python handler; SIG_DFL / SIG_IGN are the OS's and never raise here
            previous[signum] = handler
            signal.signal(signum, lambda n, frame: pending.append((n, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in pending:
            previous[signum](signum, frame)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code.

    A file that does not load is one CheckpointError saying what is wrong with it (truncated, damaged, not a
    cnnlab checkpoint) and what to do; never torch's advice to load it with weights_only off."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():      # torch's notes on pickle protocols: the verdict below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise CheckpointError(f"{path}: cannot load checkpoint: {_what_is_wrong(path, e)}; {_way_out(path)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: cannot load checkpoint: not a cnnlab checkpoint (a PyTorch file, but not a "
                              f"dict with the 'model' weights cnnlab saves); {_way_out(path)}")
    return state


def _what_is_wrong(path: Path, e: Exception) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "the file is empty (0 bytes), so truncated: a copy or transfer was cut short"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        # torch.save writes a zip archive whose directory comes last: without it, the end is missing
        return f"the file is truncated ({size:,} bytes, its end is missing): a copy or transfer was cut short"
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a {found.group(1)} object" if found else "Python objects besides tensors"
        return (f"not a cnnlab checkpoint: it holds {what}, and cnnlab loads only tensors and plain containers "
                f"(unpickling other objects can run any code)")
    if isinstance(e, EOFError):
        return f"the file is truncated ({size:,} bytes, its end is missing)"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "not a cnnlab checkpoint (not a PyTorch file at all)"
    return f"the file is damaged, or not a cnnlab checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def _way_out(path: Path) -> str:
    """What to do instead: the run's other checkpoint where it exists, else a new copy or a new run."""
    folder = path.parent
    run = folder.parent if folder.name == "checkpoints" else folder
    other = {"best.pt": "last", "last.pt": "best"}.get(path.name)
    if not (run / "config.toml").is_file():
        return "give a checkpoint cnnlab wrote (checkpoints/best.pt or last.pt of a run folder)"
    tips = []
    if other and (folder / f"{other}.pt").is_file():
        tips.append(f"the run's {other} weights may be intact: use --weights {other} with evaluate, predict or export")
    tips.append(f"copy the run folder again from where it came from, or train it again: cnnlab rerun {run}")
    return "; or ".join(tips)
