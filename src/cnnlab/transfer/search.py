"""[search]: the head's hyper-parameters chosen on the validation split, on cached frozen features.

Every combination of the listed values trains the head on the cached features, each from the same initial
weights with the run's own seed, epochs and early stopping, and is scored on the validation split by the run's
monitor. The run then trains with the best combination (from those same initial weights, so it retraces that
trial: bitwise at the same CPU thread count, see runtime/threads.py) and records every trial in results.json
(extra "search", "chosen", "search_seconds").

Config.check allows it only with [train] freeze_backbone: a trial then costs seconds, not a training run.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from cnnlab.config import Config
from cnnlab.training.callbacks import EarlyStopping, Monitor, make_monitor, snapshot
from cnnlab.training.engine import Batches, Trainer, fit


def search_head(cfg: Config, head: nn.Module, train: Batches, val: Batches, device: torch.device,
                quiet: bool) -> tuple[dict, dict]:
    """The [search] grid. Returns (the chosen [train] values, what results.json records of the search). The
    head ends with its initial weights."""
    grid = cfg.search.grid()
    monitor = search_monitor(cfg)
    initial = snapshot(head)
    trials, t0 = [], time.perf_counter()
    for values in grid:
        head.load_state_dict(initial)
        trials.append({**values, **train_trial(with_train(cfg, values), head, train, val, device)})
        if not quiet:
            print("search: " + "  ".join(f"{k} {v:g}" for k, v in trials[-1].items() if k != "diverged"))
    head.load_state_dict(initial)
    best = max(trials, key=lambda t: rank(monitor, t))
    chosen = {k: best[k] for k in grid[0]}
    if not quiet:
        print(f"search: chose {chosen} by {monitor.name} ({len(trials)} trials, {time.perf_counter() - t0:.1f}s)")
    return chosen, {"search": trials, "chosen": chosen, "search_seconds": round(time.perf_counter() - t0, 3)}


def search_monitor(cfg: Config) -> Monitor:
    """The run's monitor, on the validation split: a training metric cannot tell the regularizers apart."""
    m = make_monitor(cfg.early_stopping, cfg.checkpoint, has_val=True)
    return m if m.name.startswith("val_") else Monitor("val_" + m.name, m.mode)


def rank(monitor: Monitor, trial: dict) -> tuple:
    """Sort key, larger is better: the monitor in its direction, then validation accuracy, then loss (a
    few hundred validation images tie on accuracy often; the loss still tells them apart)."""
    if trial["diverged"]:
        return (-math.inf,)
    sign = 1 if monitor.mode == "max" else -1
    return sign * trial[monitor.name], trial["val_accuracy"], -trial["val_loss"]


def with_train(cfg: Config, values: dict) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))


def train_trial(cfg: Config, head: nn.Module, train: Batches, val: Batches, device: torch.device) -> dict:
    """Train the head as the run would (same seed, epochs, early stopping); score the weights it would report."""
    trainer = Trainer(head, cfg.train, device, cfg.seed)
    stopper = [EarlyStopping.from_config(cfg.early_stopping)] if cfg.early_stopping.enabled else []
    diverged = fit(trainer, train, val, stopper).diverged
    val_loss, val_accuracy = trainer.evaluate(val)
    return {"val_accuracy": val_accuracy, "val_loss": round(val_loss, 5), "epochs": trainer.epoch, "diverged": diverged}
