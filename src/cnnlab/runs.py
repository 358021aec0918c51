"""Run folders: everything a run produces, written atomically so a killed process never leaves half a file.

runs/<name>-<YYYYmmdd-HHMMSS>[-N]/
  config.toml          the resolved config (every value, defaults included)
  meta.json            package/torch versions, git commit, device, the exact command
  history.csv/.json    per-epoch loss, accuracy, val_loss, val_accuracy, lr, seconds
  results.json         test loss/accuracy, epochs run, best epoch, seconds, status (ok/diverged/failed)
  summary.txt          the model's layer table
  checkpoints/last.pt  model + optimizer + RNG + early-stopping state (for --resume)
  checkpoints/best.pt  the best epoch's weights
  accuracy.png, loss.png
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import tomli_w
import torch

from cnnlab.errors import CheckpointError

HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


@contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """Write to a temporary file beside `path`, fsync, then rename over it: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, argv: list[str] | None = None) -> dict:
    from cnnlab import __version__
    return {"cnnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "git_commit": git_commit(),
            "command": list(argv if argv is not None else sys.argv), "cwd": os.getcwd(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, runs_dir: str | Path, name: str) -> "RunFolder":
        """A new, unique folder: mkdir without exist_ok, so two runs started together never share one."""
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(10_000):
            path = runs_dir / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot create a run folder in {runs_dir}")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, cfg_dict: dict) -> None:
        with atomic_write(self.path / "config.toml", "wb") as f:
            tomli_w.dump(cfg_dict, f)

    def write_history(self, history: list[dict]) -> None:
        write_json(self.path / "history.json", history)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
        with atomic_write(self.path / "history.csv") as f:
            f.write(buf.getvalue())

    def read_history(self) -> list[dict]:
        p = self.path / "history.json"
        return read_json(p) if p.is_file() else []

    def write_results(self, results: dict) -> None:
        write_json(self.path / "results.json", results)

    def read_results(self) -> dict | None:
        p = self.path / "results.json"
        return read_json(p) if p.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        with atomic_write(self.path / name) as f:
            f.write(text)
