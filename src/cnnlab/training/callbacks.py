"""Callbacks: the work done around the training loop, as small objects with Keras-like hooks.

`engine.fit` owns the epochs and calls, for each callback in list order:

    on_fit_start(trainer)                 before the first epoch (also when resuming)
    on_epoch_start(trainer)               trainer.epoch = epochs completed so far
    on_batch_end(trainer, n, loss)        n images; loss is a 0-d tensor on the device: reading it
                                          (.item()) waits for the device, so do it rarely
    on_epoch_end(trainer, logs)           logs: epoch, loss, accuracy, val_loss, val_accuracy, lr, seconds;
                                          set trainer.stop_training = True to stop after this epoch
    on_fit_end(trainer)                   after the last epoch (not after an exception)
    on_exception(trainer, exc)            training raised (Ctrl-C included); the exception propagates

A callback with state to survive a resume returns it from state_dict(): last.pt keeps it under the
callback's `state_key` (its class name, plus the settings that tell two of a kind apart), never under its
place in the list, so a resume finds it whatever else the run shows (a progress bar or not, other ranks).
The decision logic (EarlyStopping.update, Monitor.improved) takes plain metric dicts, so its tests
script metric sequences without training anything, as Keras's own tests do.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from cnnlab.config import CheckpointConfig, EarlyStoppingConfig
from cnnlab.errors import ConfigError


class Callback:
    """Base class: every hook is optional."""

    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer) -> None: ...
    def on_batch_end(self, trainer, n: int, loss) -> None: ...
    def on_epoch_end(self, trainer, logs: dict) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def on_exception(self, trainer, exc: BaseException) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def state_key(self) -> str:
        """The name its state is saved under in last.pt (Lightning's Callback.state_key): the class's
        qualified name. A callback that can appear twice with different settings adds them (_key_with)."""
        return type(self).__qualname__

    def _key_with(self, **settings) -> str:
        return f"{type(self).__qualname__}{settings!r}"


def stateful(callbacks) -> list[Callback]:
    """The callbacks with a state to save (those that define state_dict)."""
    return [c for c in callbacks if type(c).state_dict is not Callback.state_dict]


def callback_states(callbacks) -> dict:
    """What last.pt keeps of the callbacks: each stateful one's state_dict() under its state_key."""
    return {c.state_key: c.state_dict() for c in stateful(callbacks)}


_OLD_KEY = re.compile(r"(\d+):(\w+)")     # "1:EarlyStopping": checkpoints written before state keys


def restore_states(callbacks, saved: dict | None) -> None:
    """At the start of fit: refuses two stateful callbacks with one state_key; after a resume (`saved`: the
    checkpoint's states) gives each its state. Older checkpoints keyed states by list position: those are
    matched by class name, in list order, since the position depended on the progress display."""
    keys = [c.state_key for c in stateful(callbacks)]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"callbacks: more than one saves its state under {', '.join(map(repr, twice))}; a resume "
                          f"could not tell them apart: pass one, or give them different settings or a state_key")
    if not saved:
        return
    old: dict[str, list[dict]] = {}
    for k in sorted((k for k in saved if _OLD_KEY.fullmatch(k)), key=lambda k: int(k.split(":")[0])):
        old.setdefault(k.split(":", 1)[1], []).append(saved[k])
    missing = []
    for c in stateful(callbacks):
        state = saved[c.state_key] if c.state_key in saved else (old.get(type(c).__name__) or [None]).pop(0)
        if state:
            c.load_state_dict(state)
        elif state is None:
            missing.append(c.state_key)
    if missing:
        warnings.warn(f"resume: the checkpoint holds no state for {', '.join(missing)}; "
                      f"{'it starts' if len(missing) == 1 else 'they start'} afresh", stacklevel=2)


# ---------------------------------------------------------------- "best": one definition

@dataclass
class Monitor:
    """Which metric decides "best", in which direction, and by how much it must improve (Keras rules)."""
    name: str = "val_loss"
    mode: str = "auto"             # auto | min | max (auto: max for accuracies, min otherwise)
    min_delta: float = 0.0

    def __post_init__(self):
        if self.mode == "auto":
            self.mode = "max" if self.name.endswith("accuracy") or self.name.endswith("acc") else "min"
        self.min_delta = abs(self.min_delta) * (1 if self.mode == "max" else -1)

    @property
    def worst(self) -> float:
        return -np.inf if self.mode == "max" else np.inf

    def improved(self, current: float, reference: float | None) -> bool:
        """current beats reference by more than min_delta in the monitor's direction (None: always)."""
        if reference is None:
            return True
        if self.mode == "max":
            return bool(np.greater(current - self.min_delta, reference))
        return bool(np.less(current - self.min_delta, reference))

    def value(self, logs: dict) -> float:
        if self.name not in logs:
            raise ConfigError(f"monitor = {self.name!r} is not a logged metric; available: {', '.join(sorted(logs))}")
        return float(logs[self.name])


def make_monitor(es: EarlyStoppingConfig, ckpt: CheckpointConfig, has_val: bool) -> Monitor:
    """Early stopping's monitor when it is on, else [checkpoint]'s; training metrics without a validation split."""
    if es.enabled:
        return Monitor(es.monitor, es.mode, es.min_delta)
    name = ckpt.monitor if has_val or not ckpt.monitor.startswith("val_") else ckpt.monitor[4:]
    return Monitor(name, ckpt.mode)


# ---------------------------------------------------------------- early stopping

class EarlyStopping(Callback):
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
        self.rule = Monitor(monitor, mode, min_delta)
        self.monitor, self.mode, self.min_delta = monitor, self.rule.mode, self.rule.min_delta
        self.patience = patience
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.reset()

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig, start_from_epoch: int | None = None) -> "EarlyStopping":
        start = cfg.start_from_epoch if start_from_epoch is None else start_from_epoch
        return cls(cfg.monitor, cfg.min_delta, cfg.patience, cfg.mode,
                   None if math.isnan(cfg.baseline) else cfg.baseline, cfg.restore_best_weights, start)

    def reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best = self.rule.worst
        self.best_weights = None
        self.best_epoch = 0
        self.stop_training = False
        self.restored = False

    def update(self, epoch: int, logs: dict, weights_fn=None) -> bool:
        """Feed one epoch's metrics; returns True when training should stop.

        weights_fn() returns a copy of the current weights (called only when they must be kept).
        """
        current = self.rule.value(logs)
        if epoch < self.start_from_epoch:
            return False
        if self.restore_best_weights and self.best_weights is None and weights_fn is not None:
            self.best_weights = weights_fn()   # Keras keeps the first epoch's weights as a fallback
            self.best_epoch = epoch
        self.wait += 1
        if self.rule.improved(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights and weights_fn is not None:
                self.best_weights = weights_fn()
            # Only restart the wait if we beat the baseline as well.
            if self.rule.improved(current, self.baseline):
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

    # -- callback hooks
    def on_epoch_end(self, trainer, logs: dict) -> None:
        if self.update(trainer.epoch - 1, logs, lambda: snapshot(trainer.model)):
            trainer.stop_training = True

    def on_fit_end(self, trainer) -> None:
        weights = None if trainer.diverged else self.weights_to_restore(trainer.epoch - 1)
        if weights is not None:
            trainer.model.load_state_dict(weights)
            self.restored = True

    @property
    def state_key(self) -> str:
        return self._key_with(monitor=self.monitor, mode=self.mode)

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


# ---------------------------------------------------------------- checkpoints, history, trackers

class ModelCheckpoint(Callback):
    """best.pt when the monitor improves (the same rule as early stopping), last.pt every `every` epochs
    and at the final epoch: everything --resume needs (model, optimizer, RNGs, callback states)."""

    def __init__(self, recorder, monitor: Monitor, every: int = 1, start_from_epoch: int = 0, identity: dict | None = None):
        self.recorder, self.rule, self.every, self.start = recorder, monitor, every, start_from_epoch
        self.identity = identity or {}
        self.best: float | None = None
        self.best_epoch: int | None = None       # 1-based

    def on_epoch_end(self, trainer, logs: dict) -> None:
        if trainer.diverged:
            return                               # a NaN model is worth neither a best nor a resume point
        if trainer.epoch > self.start and self.rule.improved(self.rule.value(logs), self.best):
            self.best, self.best_epoch = self.rule.value(logs), trainer.epoch
            self.recorder.save_checkpoint("best.pt", {"model": trainer.model.state_dict(), "epoch": trainer.epoch})
        final = trainer.stop_training or trainer.epoch == trainer.cfg.epochs
        if trainer.epoch % self.every == 0 or final:
            self.recorder.save_checkpoint("last.pt", {**trainer.state_dict(), "identity": self.identity})

    @property
    def state_key(self) -> str:
        return self._key_with(monitor=self.rule.name, mode=self.rule.mode)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class HistoryWriter(Callback):
    """history.json/.csv after every epoch, so a killed run keeps its curves."""

    def __init__(self, recorder):
        self.recorder = recorder

    def on_epoch_end(self, trainer, logs: dict) -> None:
        self.recorder.write_history(trainer.history)


class TrackerLogger(Callback):
    """Per-epoch metrics to the optional trackers (TensorBoard, MLflow) held by the recorder."""

    def __init__(self, recorder):
        self.recorder = recorder

    def on_epoch_end(self, trainer, logs: dict) -> None:
        for t in self.recorder.trackers:
            t.log_epoch(logs)


# ---------------------------------------------------------------- progress display

class ProgressBar(Callback):
    """A tqdm bar while an epoch runs (a widget in notebooks, text in a terminal), refreshed ~8 times an epoch;
    then, as Keras's fit does, one printed line with the epoch's metrics in its place. Printed, not the bar's
    postfix: a terminal cuts a bar at its width (val_accuracy's value went first at 120 columns), a line wraps."""

    def __init__(self, label: str = ""):
        self.label, self.bar, self.i = label, None, 0

    def on_epoch_start(self, trainer) -> None:
        from tqdm.auto import tqdm
        phase = " [head]" if trainer.phase == "head" else ""
        self.desc = f"{self.label}{phase} epoch {trainer.epoch + 1}/{trainer.cfg.epochs}".strip()
        self.bar = tqdm(total=trainer.train_size, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
                        desc=self.desc)
        self.i, self.refresh = 0, max(1, trainer.steps_per_epoch // 8)

    def on_batch_end(self, trainer, n: int, loss) -> None:
        self.bar.update(n)
        if self.i % self.refresh == 0:
            self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        self.i += 1

    def on_epoch_end(self, trainer, logs: dict) -> None:
        from tqdm.auto import tqdm
        self.bar.close()
        tqdm.write(f"{self.desc}: " + "  ".join(f"{k} {logs[k]:.4f}" for k in METRICS if k in logs) +
                   f"  {logs['seconds']:.1f}s")

    def on_exception(self, trainer, exc) -> None:
        if self.bar is not None:
            self.bar.close()


class PrintLogger(Callback):
    """One line per epoch, for logs (`-q`)."""

    def on_epoch_end(self, trainer, logs: dict) -> None:
        print(format_logs(logs, trainer.cfg.epochs), flush=True)


METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def format_logs(logs: dict, epochs: int) -> str:
    parts = [f"epoch {logs['epoch']}/{epochs}"]
    parts += [f"{k} {logs[k]:.4f}" for k in METRICS if k in logs]
    parts.append(f"{logs['seconds']:.1f}s")
    return "  ".join(parts)
