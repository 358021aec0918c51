"""Run folders: everything a run produces, written atomically so a killed process never leaves half a file.

runs/<name>-<YYYYmmdd-HHMMSS>[-N]/
  config.toml          the resolved config (every value, defaults included)
  meta.json            package/torch versions, git commit, device, the exact command
  history.csv/.json    per-epoch loss, accuracy, val_loss, val_accuracy, lr, seconds
  results.json         test loss/accuracy, epochs run, best epoch, seconds, status (ok/diverged/failed)
  summary.txt          the model's layer table
  checkpoints/last.pt  model + optimizer + RNG + early-stopping state (for --resume)
  checkpoints/best.pt  the best epoch's weights (by the run's one monitor: early stopping's, else [checkpoint]'s)
  checkpoints/backbone.pt  frozen-feature runs: the frozen backbone (the checkpoints hold the head)
  classes.json         class names in label order
  preprocess.json      how images become network inputs (cnnlab.data.preprocess.Preprocess)
  skipped_images.txt   only when [data] skip_corrupt left images out: path and reason of each
  accuracy.png, loss.png
  per_class.csv, confusion.png, confused_pairs.csv, errors.png   the test-split evaluation

Files are written by cnnlab.records.io (atomic). `RunRecorder` is the only writer of a run folder: under torchrun only rank 0 has a real one, the other
ranks get a recorder whose writes do nothing (nanoGPT's single `master_process` flag, in one place).
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w

from cnnlab.errors import ConfigError
from cnnlab.records.io import atomic_write, save_checkpoint, write_json, read_json

HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, runs_dir: str | Path, name: str) -> "RunFolder":
        """A new, unique folder: mkdir without exist_ok, so two runs started together never share one.
        `name` must be one folder name (Config.check says so first; this guard holds for every caller)."""
        from cnnlab.config import name_problem
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"name {name!r} {problem}: a run or suite folder is one folder inside --runs-dir "
                              f"({runs_dir})")
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

    def write_config(self, cfg_dict: dict, comment: str = "") -> None:
        """config.toml; `comment`: lines written above the tables, as TOML comments."""
        with atomic_write(self.path / "config.toml", "wb") as f:
            f.write("".join(f"# {line}\n" for line in comment.splitlines()).encode())
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


# ---------------------------------------------------------------- results

@dataclass
class Results:
    """results.json: what a run (or a failed suite row) ended with. NaN is written as null, once, here."""
    name: str
    status: str                       # ok | diverged | failed
    label: str = ""
    model: str = ""
    optimizer: str = ""
    batch_size: int = 0
    seed: int = 0
    epochs_max: int = 0
    epochs_run: int = 0
    best_epoch: int | None = None     # 1-based, by the run's monitor
    stopped_early: bool = False
    restored_best_weights: bool = False
    weights: str = "last"             # the weights the test metrics come from: best (restored) or last
    test_loss: float | None = None
    test_accuracy: float | None = None
    test_top5: float | None = None
    test_macro_f1: float | None = None
    val_loss: float | None = None     # the reported weights' validation scores (their epoch's, in history)
    val_accuracy: float | None = None
    seconds: float = 0.0
    train_images_per_second: float = 0.0
    reference_accuracy: float | None = None
    reference_loss: float | None = None
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in {**d, **extra}.items()}

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------- where a run stands

@dataclass
class RunState:
    """Where a run folder stands, from its files alone: results.json says how a run ended; a run without one was
    killed, interrupted or is still training (its history and checkpoints say how far it got)."""
    status: str                       # ok | diverged | failed | unfinished | not started
    epochs_done: int                  # epochs in history.json (results.json's epochs_run once it ended)
    epochs_max: int                   # [train] epochs (0 when the folder does not say)
    checkpoints: list[str]            # the weight files present: "best", "last"

    @property
    def finished(self) -> bool:
        return self.status in ("ok", "diverged", "failed")

    def describe(self) -> str:
        """"ok", "unfinished (epoch 2/20)", "not started (no epoch finished)", ..."""
        if self.status == "unfinished":
            return f"unfinished (epoch {self.epochs_done}/{self.epochs_max or '?'})"
        if self.status == "not started":
            return "not started (no epoch finished, no checkpoint)"
        return self.status


def run_state(run: RunFolder) -> RunState:
    import tomllib
    results = run.read_results() or {}
    checkpoints = [w for w in ("best", "last") if (run.checkpoints / f"{w}.pt").is_file()]
    epochs_max = results.get("epochs_max") or 0
    if not epochs_max and (run.path / "config.toml").is_file():
        try:
            epochs_max = int(tomllib.loads((run.path / "config.toml").read_text(encoding="utf-8"))
                             .get("train", {}).get("epochs", 0))
        except (tomllib.TOMLDecodeError, TypeError, ValueError):
            epochs_max = 0                # a damaged config: loading it says what is wrong, not this
    if results.get("status"):
        return RunState(results["status"], int(results.get("epochs_run") or 0), epochs_max, checkpoints)
    done = len(run.read_history())
    return RunState("unfinished" if done or checkpoints else "not started", done, epochs_max, checkpoints)


# ---------------------------------------------------------------- the recorder

class RunRecorder:
    """The one writer of a run folder; every method is a no-op where `folder` is None (ranks > 0)."""

    def __init__(self, folder: RunFolder | None):
        self.folder = folder
        self.trackers: list = []

    @property
    def path(self) -> Path | None:
        return self.folder.path if self.folder else None

    @property
    def active(self) -> bool:
        return self.folder is not None

    def start_trackers(self, names: list[str], config: dict, mlflow_uri: str) -> None:
        if self.folder and names:
            from cnnlab.records.trackers import make_trackers
            self.trackers = make_trackers(names, self.folder.path, config, mlflow_uri)

    def write_json(self, name: str, obj) -> None:
        if self.folder:
            write_json(self.folder.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.folder:
            self.folder.write_text(name, text)

    def write_config(self, cfg_dict: dict, comment: str = "") -> None:
        if self.folder:
            self.folder.write_config(cfg_dict, comment)

    def write_skipped(self, skipped: list) -> None:
        """skipped_images.txt: one `path<TAB>reason` line per image [data] skip_corrupt left out (none: no file)."""
        if self.folder and skipped:
            lines = (f"{p}\t{' '.join(str(why).split())}\n" for p, why in skipped)     # a reason on one line
            self.folder.write_text("skipped_images.txt", "".join(lines))

    def write_history(self, history: list[dict]) -> None:
        if self.folder:
            self.folder.write_history(history)

    def save_checkpoint(self, name: str, obj: dict) -> None:
        if self.folder:
            save_checkpoint(self.folder.checkpoints / name, obj)

    def write_results(self, results: Results) -> None:
        if self.folder:
            self.folder.write_results(results.to_json())
            for t in self.trackers:
                t.log_results(results.to_json(), self.folder.path)

    def call(self, fn, *args, **kwargs):
        """Run a writer function (plots, evaluation files) with the folder path, on the writing rank only."""
        if self.folder:
            return fn(self.folder.path, *args, **kwargs)
        return None

    def close(self) -> None:
        """Close the trackers (on every path: a row that raised must not leave an MLflow run active)."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close()
            except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
                pass
