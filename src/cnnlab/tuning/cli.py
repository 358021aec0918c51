"""`cnnlab tune` and `cnnlab lr-find`: the command line of the tuning package.

Its own module so that building the parser imports no torch or Optuna (`cnnlab --version` stays instant).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.errors import CnnlabError


def add_parsers(sub) -> None:
    from cnnlab.cli_options import common
    from cnnlab.experiments.launch import add_launcher_options
    p = sub.add_parser("tune", help="choose hyper-parameters on the validation split: an Optuna study over the "
                                    "config's [tune] table (test scored once, for the chosen config)")
    p.add_argument("config", nargs="?", help="a TOML file (or packaged config) with a [tune] table")
    p.add_argument("--trials", type=int, metavar="N", help="finished (complete or pruned) trials the study wants")
    p.add_argument("--resume", metavar="STUDY", help="continue a study folder (killed, or asked for more --trials)")
    p.add_argument("--storage", metavar="URL", help="any Optuna storage: FILE.log (a journal file), sqlite:///FILE, "
                   "postgresql://user:pass@host/db (default: STUDY/study.db; with --launcher slurm STUDY/study.log)")
    p.add_argument("--jobs", type=int, metavar="N", help="worker processes on this machine, each with 1/N of the "
                   "cores; with --launcher slurm, worker tasks (default: one per trial still to run)")
    p.add_argument("--metric", help="what trials maximize: val_accuracy (default) or minimize: val_loss")
    p.add_argument("--pruner", help="median (default: Optuna's MedianPruner), hyperband or none")
    p.add_argument("-v", "--verbose", action="store_true", help="print every epoch of every trial (default: one "
                                                                  "line per trial)")
    common(p)
    add_launcher_options(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("lr-find", help="the learning-rate range test (fastai's lr_find): loss vs lr figure and a "
                                       "suggested lr (the valley rule)")
    p.add_argument("config", help="a TOML file or packaged config; its data, model, optimizer and augmentation")
    p.add_argument("--start-lr", type=float, default=1e-7, help="the first step's lr (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="the lr the last step would reach (default 10)")
    p.add_argument("--steps", type=int, default=200, help="training steps, lr rising exponentially (default 200)")
    p.add_argument("--out", help="folder for lr_find.png and lr_find.json (default: RUNS/<name>-lr-find-<stamp>)")
    common(p)
    p.set_defaults(func=cmd_lr_find)


def cmd_tune(a: argparse.Namespace) -> int:
    from cnnlab.experiments.launch import launcher_from_args
    from cnnlab.tuning import tune as tuning
    launcher = launcher_from_args(a)
    if a.resume:
        study_dir = _resume_checks(a)
    else:
        if not a.config:
            raise CnnlabError("tune: give a config with a [tune] table, or --resume STUDY")
        if a.trials is None:
            raise CnnlabError("tune: give --trials N, the number of trials the study should finish")
        from cnnlab.cli_options import load_from_args
        from cnnlab.configs import config_file
        path = config_file(a.config)
        cfg = load_from_args(path, a)
        study_dir = tuning.start(cfg, path, a.runs_dir, trials=a.trials, storage=a.storage,
                                 metric=a.metric or "val_accuracy", pruner=a.pruner or "median",
                                 journal=launcher is not None, argv=a.command)
    result = tuning.tune(study_dir, trials=a.trials, storage=a.storage, jobs=a.jobs, launcher=launcher,
                         progress="line" if a.verbose else "none", argv=a.command)
    return 0 if result.complete else 1


def _resume_checks(a) -> Path:
    """--resume STUDY: the study's own config, metric and pruner; only --trials, --storage, --jobs change."""
    from cnnlab.tuning.study import read_spec
    if a.config:
        raise CnnlabError(f"tune: give a config or --resume STUDY, not both ({a.config} and {a.resume})")
    changed = [opt for opt, v in (("--set", a.overrides), ("--data", a.data), ("--data-dir", a.data_dir),
                                  ("--seed", a.seed), ("--seeds", a.seeds), ("--device", a.device)) if v]
    if changed:
        raise CnnlabError(f"tune --resume: {', '.join(changed)} cannot change a study (its trials must train the "
                          f"same config); start a new one: cnnlab tune CONFIG")
    spec = read_spec(a.resume)
    for opt, given, kept in (("--metric", a.metric, spec["metric"]), ("--pruner", a.pruner, spec["pruner"])):
        if given and given != kept:
            raise CnnlabError(f"tune --resume: {opt} {given}: the study was started with {kept}, and keeps it")
    return Path(a.resume)


def cmd_lr_find(a: argparse.Namespace) -> int:
    from cnnlab.cli_options import load_from_args
    from cnnlab.configs import config_file
    from cnnlab.tuning.lr_find import run_lr_find
    path = config_file(a.config)
    run_lr_find(load_from_args(path, a), a.out, a.runs_dir, start_lr=a.start_lr, end_lr=a.end_lr, steps=a.steps,
                progress="line" if a.quiet else "bar")
    return 0
