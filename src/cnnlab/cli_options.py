"""The options several `cnnlab` commands share, and what they turn into: the parts cli.py, tuning/cli.py and
inference/explain_cli.py each build their subcommands from (so no subcommand module imports cli.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.config import Config


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--data", metavar="PRESET|FILE",
                   help="data preset or TOML file whose [data] keys replace the config's, e.g. --data cifar10s")
    p.add_argument("--data-dir", help="folder holding the data sets (default: $CNNLAB_DATA or ~/.cache/cnnlab/data)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are created (default: ./runs)")
    p.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    p.add_argument("--seeds", type=int, help="run each experiment with N seeds (seed, seed+1, ...): mean ± std and tests")
    p.add_argument("--folds", type=int, metavar="K", help="K-fold cross-validation: K runs, each validating on one "
                   "stratified K-th of the training split (the seed fixes the folds); mean ± std (shortcut for --set folds=K)")
    p.add_argument("--device", help="shortcut for --set device=...; auto, cpu, cuda, cuda:N")
    p.add_argument("--logger", action="append", choices=["tensorboard", "mlflow"], default=[],
                   help="also log to TensorBoard or MLflow (repeatable; optional extras)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars: one line per epoch (for logs)")
    p.add_argument("--deterministic", action="store_true",
                   help="shortcut for --set train.deterministic=true: one fixed CPU thread count instead of "
                        "following the machine's load, and torch's deterministic algorithms (slower under load)")


def overrides_of(a: argparse.Namespace) -> list:
    """--set strings (parsed as TOML values), then the typed shortcuts (--data-dir, --seed, ...)."""
    from cnnlab.config import parse_set
    out: list = [parse_set(item) for item in a.overrides]
    if a.data_dir:
        out.append(("data.data_dir", a.data_dir))
    if a.seed is not None:
        out.append(("seed", a.seed))
    if a.device:
        out.append(("device", a.device))
    if a.seeds is not None:
        out.append(("seeds", a.seeds))
    if getattr(a, "folds", None) is not None:
        out.append(("folds", a.folds))
    if a.logger:
        out.append(("tracking.loggers", list(dict.fromkeys(a.logger))))
    if a.deterministic:
        out.append(("train.deterministic", True))
    return out


def trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="rebuild a run folder whose model is package.module:function: imports and runs that code, "
                        "so only for folders from someone you trust (README: Sharing a run)")
    p.add_argument("--code-dir", action="append", default=[], metavar="DIR",
                   help="a folder to import the run's model code from (put first on the Python path; repeatable)")


def code_dirs(a) -> None:
    """--code-dir: where a run folder's model module is found here (first on the Python path)."""
    for d in reversed(getattr(a, "code_dir", None) or []):
        if not Path(d).is_dir():
            raise CnnlabError(f"--code-dir {d}: no such folder")
        sys.path.insert(0, str(Path(d).resolve()))


def load_from_args(path: Path, a) -> Config:
    from cnnlab.config import load_config, read_data_preset
    return load_config(path, overrides_of(a), read_data_preset(a.data))


def run_folder(path: str):
    from cnnlab.records.runs import RunFolder
    run = RunFolder(Path(path))
    if not (run.path / "config.toml").is_file():
        raise CnnlabError(f"{run.path}: not a run folder (no config.toml)")
    return run
