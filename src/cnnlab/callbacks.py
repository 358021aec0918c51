"""Callbacks with Keras semantics, driven by plain per-epoch metric dicts (testable without training)."""
from __future__ import annotations

import math

import numpy as np

from cnnlab.config import EarlyStoppingConfig
from cnnlab.errors import ConfigError


class EarlyStopping:
    """keras.callbacks.EarlyStopping, same arguments and the same decisions.

    Each epoch (0-based `epoch`) the monitored value is compared with the best so far; it counts as an
    improvement when it beats the best by more than min_delta (in the direction of `mode`). After
    `patience` epochs without improvement training stops. Epochs before `start_from_epoch` are ignored.
    With restore_best_weights the model gets the weights of the best epoch back when training stops,
    and also at the end of training when the best epoch was not the last one (Keras >= 2.13/3.x).
    A monitor that is not in the logs is an error, not a warning: a typo would otherwise silently
    disable early stopping.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, mode: str = "auto",
                 baseline: float | None = None, restore_best_weights: bool = False, start_from_epoch: int = 0):
        self.monitor = monitor
        self.patience = patience
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        if mode == "auto":
            mode = "max" if monitor.endswith("accuracy") or monitor.endswith("acc") else "min"
        self.mode = mode
        self.min_delta = abs(min_delta) * (1 if mode == "max" else -1)
        self.reset()

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> "EarlyStopping":
        return cls(cfg.monitor, cfg.min_delta, cfg.patience, cfg.mode,
                   None if math.isnan(cfg.baseline) else cfg.baseline, cfg.restore_best_weights, cfg.start_from_epoch)

    def reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best = -np.inf if self.mode == "max" else np.inf
        self.best_weights = None
        self.best_epoch = 0
        self.stop_training = False

    def _improved(self, current: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.mode == "max":
            return np.greater(current - self.min_delta, reference)
        return np.less(current - self.min_delta, reference)

    def on_epoch_end(self, epoch: int, logs: dict, weights_fn=None) -> bool:
        """Feed one epoch's metrics; returns True when training should stop.

        weights_fn() returns a copy of the current weights (called only when they must be kept).
        """
        if self.monitor not in logs:
            raise ConfigError(f"[early_stopping] monitor = {self.monitor!r} is not a logged metric; "
                              f"available: {', '.join(sorted(logs))}")
        current = float(logs[self.monitor])
        if epoch < self.start_from_epoch:
            return False
        if self.restore_best_weights and self.best_weights is None and weights_fn is not None:
            self.best_weights = weights_fn()   # Keras keeps the first epoch's weights as a fallback
            self.best_epoch = epoch
        self.wait += 1
        if self._improved(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights and weights_fn is not None:
                self.best_weights = weights_fn()
            # Only restart the wait if we beat the baseline as well.
            if self._improved(current, self.baseline):
                self.wait = 0
            return False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.stop_training = True
            return True
        return False

    def weights_to_restore(self, last_epoch: int):
        """At the end of training: the best weights when they should replace the last ones, else None."""
        if self.restore_best_weights and self.best_weights is not None and self.best_epoch != last_epoch:
            return self.best_weights
        return None

    def state_dict(self) -> dict:
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best": float(self.best),
                "best_epoch": self.best_epoch, "stop_training": self.stop_training,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def snapshot(model) -> dict:
    """A detached copy of a model's weights (for restore_best_weights)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

