"""Files that are never half-written: atomic writes, JSON, and checkpoints loaded safely.

Every file cnnlab writes goes through `atomic_write` (a temporary file beside the target, fsync, rename), so a
killed process leaves the previous file or none. Checkpoints are read with `weights_only=True`: tensors and
plain containers only, never arbitrary code.
"""
from __future__ import annotations

import json
import os
import tempfile
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
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
