"""One Optuna trial: the base config with the sampled values, trained by the normal machinery into its own run
folder (STUDY/trials/NNNN), choosing on the validation split only.

The test split is left out of every trial (its split is replaced by an empty one, so the run scores nothing
on it): only the chosen configuration is scored on test, once, at the end (tuning/outputs.py). The pruner
sees each epoch's validation metric through `PruningCallback`; a pruned trial stops at the end of that epoch
like an early-stopped run (its folder complete, results.json status "pruned"), and is told to Optuna as PRUNED.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import optuna
import torch

from cnnlab.config import Config, apply_overrides
from cnnlab.data.stream import Batches
from cnnlab.errors import ConfigError
from cnnlab.experiments.plan import DataCache, Plan
from cnnlab.experiments.prepare import prepare
from cnnlab.experiments.run import record_start, train
from cnnlab.records.runs import RunFolder, RunRecorder
from cnnlab.training.callbacks import Callback, PrintLogger


class PruningCallback(Callback):
    """Reports each epoch's validation metric to the trial (step = epoch, 1-based) and stops training at the
    end of an epoch the pruner prunes (Optuna's integration callbacks do the same, raising TrialPruned once
    the framework has ended the epoch cleanly)."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None
        self.value: float | None = None

    def on_epoch_end(self, trainer, logs: dict) -> None:
        if self.metric not in logs:
            raise ConfigError(f"tune: the metric {self.metric!r} is not logged (no validation split?); "
                              f"logged: {', '.join(sorted(logs))}")
        self.value = float(logs[self.metric])
        self.trial.report(self.value, logs["epoch"])
        if self.trial.should_prune():
            self.pruned_at = logs["epoch"]
            trainer.stop_training = True


def trial_config(base: Config, values: list, number: int | None = None) -> Config:
    """The base config with a trial's values applied and checked (the cross-table rules too)."""
    cfg = apply_overrides(copy.deepcopy(base), values)
    shown = ", ".join(f"{k} = {v!r}" for k, v in values)
    cfg.check(f"tune{f' trial {number}' if number is not None else ''} ({shown})")
    return cfg


def without_test(plan: Plan) -> Plan:
    """The plan with an empty test split: `train` then scores nothing on test and writes no test evaluation."""
    x = plan.data.x_train
    empty = Batches(torch.empty((0, *x.shape[1:]), dtype=x.dtype, device=plan.device),
                    torch.empty(0, dtype=torch.long, device=plan.device))
    plan.splits = dataclasses.replace(plan.splits, test=empty)
    return plan


def run_trial(trial: optuna.Trial, cfg: Config, folder: Path, metric: str, *, cache: DataCache,
              progress: str = "none", callbacks: list[Callback] = (), argv=None) -> float:
    """Train the trial's config into `folder`; the objective's value: the validation metric of the weights
    the run reports (the restored best epoch's, else the last epoch's), as `cnnlab run` of it would give."""
    plan = without_test(prepare(cfg, source=str(folder), progress="none", data_cache=cache))
    if not len(plan.splits.val):
        raise ConfigError(f"tune: trials choose on the validation split, but [data] val_fraction = "
                          f"{cfg.data.val_fraction} gives none; set it, e.g. --set data.val_fraction=0.1")
    folder.mkdir(parents=True)               # not exist_ok: a trial number is one run, ever
    recorder = RunRecorder(RunFolder(folder))
    pruning = PruningCallback(trial, metric)
    shown = [PrintLogger()] if progress == "line" else []
    try:
        record_start(recorder, plan, argv)
        outcome = train(plan, recorder, [pruning, *shown, *callbacks], progress="none")
    finally:
        recorder.close()
    res = outcome.results
    if pruning.pruned_at is not None:
        res.status = "pruned"
        res.reason = (f"pruned by the study's pruner after epoch {pruning.pruned_at} ({metric} "
                      f"{pruning.value:.4f}); a pruned trial is not a finished run")
        RunFolder(folder).write_results(res.to_json())
        raise optuna.TrialPruned(res.reason)
    if not res.ok:
        trial.set_user_attr("reason", res.reason)
        return float("nan")                  # Optuna records a NaN objective as a FAILed trial
    epoch = res.best_epoch if res.restored_best_weights and res.best_epoch else res.epochs_run
    value = float(outcome.history[epoch - 1][metric])
    trial.set_user_attr("epochs", res.epochs_run)
    trial.set_user_attr("weights_epoch", epoch)
    return value if math.isfinite(value) else float("nan")
