"""EarlyStopping with Keras semantics, driven by scripted metric sequences (no training).

The expectations follow keras/src/callbacks/early_stopping_test.py and the Keras implementation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnlab.training.callbacks import EarlyStopping, snapshot
from cnnlab.config import EarlyStoppingConfig
from cnnlab.errors import ConfigError


def drive(es: EarlyStopping, values, monitor: str | None = None, weights: bool = False):
    """Feed values epoch by epoch like a fit loop; returns (epochs trained, stop epoch or None)."""
    monitor = monitor or es.monitor
    es.reset()
    for epoch, v in enumerate(values):
        wf = (lambda e=epoch: e) if weights else None          # the 'weights' of an epoch: its number
        if es.update(epoch, {monitor: v, "other": 0.0}, wf):
            return epoch + 1, epoch
    return len(values), None


# ---------------------------------------------------------------- patience

def test_patience_stops_at_the_right_epoch():
    es = EarlyStopping(monitor="val_loss", patience=2)
    trained, stopped = drive(es, [1.0, 0.9, 0.95, 0.96, 0.97])
    assert stopped == 3 and trained == 4
    assert es.stopped_epoch == 3 and es.stop_training
    assert es.best == pytest.approx(0.9) and es.best_epoch == 1


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_keras_patience_cases(patience):
    # keras test_early_stopping_patience: stopped_epoch == max(patience, 1) + 2
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    es = EarlyStopping(monitor="loss", patience=patience)
    drive(es, losses)
    assert es.stopped_epoch == max(patience, 1) + 2


def test_no_stop_while_improving():
    es = EarlyStopping(monitor="loss", patience=0)
    trained, stopped = drive(es, [5, 4, 3, 2, 1])
    assert stopped is None and trained == 5 and es.wait == 0 and es.stopped_epoch == 0


def test_patience_zero_never_stops_at_epoch_zero():
    es = EarlyStopping(monitor="loss", patience=0, baseline=0.1)
    assert es.update(0, {"loss": 1.0}) is False          # epoch > 0 is required to stop
    assert es.update(1, {"loss": 1.5}) is True


# ---------------------------------------------------------------- mode

@pytest.mark.parametrize("monitor, mode, expected", [
    ("val_loss", "auto", "min"), ("loss", "auto", "min"),
    ("val_accuracy", "auto", "max"), ("accuracy", "auto", "max"), ("acc", "auto", "max"),
    ("val_loss", "max", "max"), ("val_accuracy", "min", "min"),
])
def test_mode_resolution(monitor, mode, expected):
    es = EarlyStopping(monitor=monitor, mode=mode)
    assert es.mode == expected
    assert es.best == (math.inf if expected == "min" else -math.inf)


def test_mode_max_stops_when_accuracy_stops_rising():
    es = EarlyStopping(monitor="val_accuracy", patience=2)               # auto -> max
    assert drive(es, [0.5, 0.6, 0.59, 0.7, 0.69, 0.68, 0.9]) == (6, 5)
    assert es.best == pytest.approx(0.7) and es.best_epoch == 3


def test_mode_min_on_an_accuracy_treats_falling_as_better():
    es = EarlyStopping(monitor="val_accuracy", mode="min", patience=0)
    assert drive(es, [0.5, 0.4, 0.45]) == (3, 2)


# ---------------------------------------------------------------- min_delta

def test_min_delta_min_mode():
    # 0.95 beats 1.0 by only 0.05 < 0.1: not an improvement
    es = EarlyStopping(monitor="val_loss", min_delta=0.1, patience=1)
    assert drive(es, [1.0, 0.95, 0.5]) == (2, 1)
    es = EarlyStopping(monitor="val_loss", min_delta=0.01, patience=1)
    assert drive(es, [1.0, 0.95, 0.94, 0.93]) == (3, 2)          # 0.94 is within 0.01 of 0.95


def test_min_delta_is_absolute_and_best_is_not_moved_by_small_changes():
    es = EarlyStopping(monitor="val_loss", min_delta=-0.1, patience=2)   # Keras uses abs(min_delta)
    trained, stopped = drive(es, [1.0, 0.95, 0.85, 0.8])
    # 0.95: no improvement (wait 1); 0.85 beats best 1.0 by 0.15: improvement; 0.8: wait 1
    assert stopped is None and es.best == pytest.approx(0.85) and es.best_epoch == 2 and es.wait == 1


def test_min_delta_max_mode():
    es = EarlyStopping(monitor="val_accuracy", mode="max", min_delta=0.1, patience=0)
    assert drive(es, [0.5, 0.55]) == (2, 1)
    es = EarlyStopping(monitor="val_accuracy", mode="max", min_delta=0.1, patience=0)
    assert drive(es, [0.5, 0.65, 0.7]) == (3, 2)


# ---------------------------------------------------------------- baseline

def test_baseline_keeps_counting_until_beaten():
    es = EarlyStopping(monitor="val_accuracy", patience=2, baseline=0.6)
    assert drive(es, [0.3, 0.4, 0.35]) == (3, 2)        # improving but below the baseline: the wait grows
    es = EarlyStopping(monitor="val_accuracy", patience=2)
    assert drive(es, [0.3, 0.4, 0.35]) == (3, None)      # without a baseline the same values go on


def test_baseline_beaten_resets_wait():
    es = EarlyStopping(monitor="val_loss", patience=1, baseline=0.5)
    assert drive(es, [0.9, 0.4, 0.45, 0.3]) == (3, 2)
    assert es.best == pytest.approx(0.4)


# ---------------------------------------------------------------- restore_best_weights (Keras's DummyModel cases)

def test_restore_best_weights_after_patience():
    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    trained, stopped = drive(es, [0.2, 0.15, 0.1, 0.11, 0.12], weights=True)
    assert (trained, stopped) == (5, 4)
    assert es.best_epoch == 2 and es.weights_to_restore(stopped) == 2


def test_restore_when_nothing_beats_the_baseline():
    es = EarlyStopping(monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True)
    trained, stopped = drive(es, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], weights=True)
    assert trained == 5 and stopped == 4
    assert es.weights_to_restore(stopped) == 2


def test_restore_when_training_ends_for_another_reason():
    es = EarlyStopping(monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True)
    trained, stopped = drive(es, [0.9, 0.8, 0.7, 0.71], weights=True)   # max epochs reached at epoch 3
    assert stopped is None and trained == 4
    assert es.weights_to_restore(3) == 2


def test_nothing_to_restore_when_last_epoch_is_best_or_disabled():
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    drive(es, [0.5, 0.4, 0.3], weights=True)
    assert es.weights_to_restore(2) is None
    es = EarlyStopping(monitor="val_loss", patience=1)
    drive(es, [0.2, 0.3, 0.4], weights=True)
    assert es.best_weights is None and es.weights_to_restore(2) is None


def test_first_monitored_epoch_is_the_fallback():
    # Keras keeps the first monitored epoch's weights even when it never improves on the initial best.
    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True, start_from_epoch=2)
    trained, stopped = drive(es, [0.1, 0.1, math.inf, math.inf, math.inf], weights=True)
    assert es.best_weights == 2 and stopped == 3 and es.weights_to_restore(3) == 2


def test_weights_fn_only_called_when_needed():
    calls = []
    es = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    for epoch, v in enumerate([1.0, 0.5, 0.7, 0.8]):
        es.update(epoch, {"loss": v}, lambda e=epoch: calls.append(e) or e)
    assert calls == [0, 0, 1]          # first epoch (fallback + improvement), then the improvement at 1


def test_restore_with_real_model_weights():
    model = nn.Linear(2, 1)
    es = EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    saved = {}
    for epoch, v in enumerate([0.5, 0.3, 0.4]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        saved[epoch] = snapshot(model)
        if es.update(epoch, {"val_loss": v}, lambda: snapshot(model)):
            break
    best = es.weights_to_restore(epoch)
    assert torch.equal(best["weight"], torch.full((1, 2), 1.0))
    model.weight.data.fill_(7)
    assert torch.equal(best["weight"], torch.full((1, 2), 1.0))   # a copy, not a view of the live weights


# ---------------------------------------------------------------- start_from_epoch

def test_start_from_epoch_ignores_warmup_epochs():
    es = EarlyStopping(monitor="loss", patience=0, start_from_epoch=2)
    # rising loss: without the warm-up it would stop at epoch 1
    assert drive(es, [1.0, 2.0, 3.0, 4.0, 5.0]) == (4, 3)
    assert es.best == 3.0 and es.best_epoch == 2
    es = EarlyStopping(monitor="loss", patience=0)
    assert drive(es, [1.0, 2.0, 3.0]) == (2, 1)


@pytest.mark.parametrize("patience, start", [(3, 2), (0, 2), (1, 4)])
def test_start_from_epoch_keras_bound(patience, start):
    # keras test_early_stopping_with_start_from_epoch: at least patience + start_from_epoch epochs run
    es = EarlyStopping(monitor="mse", patience=patience, start_from_epoch=start)
    trained, stopped = drive(es, [1.0] * 20)
    assert stopped is not None and trained >= patience + start


# ---------------------------------------------------------------- errors, config, state

def test_missing_monitor_is_an_error():
    es = EarlyStopping(monitor="val_accuracy")
    with pytest.raises(ConfigError, match="val_accuracy") as e:
        es.update(0, {"loss": 1.0, "accuracy": 0.5})
    assert "accuracy, loss" in str(e.value)       # lists what is available


def test_from_config():
    cfg = EarlyStoppingConfig(enabled=True, monitor="val_accuracy", mode="auto", patience=2, min_delta=0.01,
                              restore_best_weights=True, start_from_epoch=1)
    es = EarlyStopping.from_config(cfg)
    assert (es.monitor, es.mode, es.patience, es.min_delta, es.restore_best_weights, es.start_from_epoch) == \
        ("val_accuracy", "max", 2, 0.01, True, 1)
    assert es.baseline is None                     # NaN in the config means no baseline
    es2 = EarlyStopping.from_config(EarlyStoppingConfig(monitor="val_loss", baseline=0.3, min_delta=0.01))
    assert es2.baseline == 0.3 and es2.min_delta == -0.01


def test_state_dict_round_trip_continues_identically():
    values = [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.77]
    ref = EarlyStopping(monitor="val_loss", patience=3)
    ref_result = drive(ref, values)
    a = EarlyStopping(monitor="val_loss", patience=3)
    for epoch, v in enumerate(values[:3]):
        a.update(epoch, {"val_loss": v})
    b = EarlyStopping(monitor="val_loss", patience=3)
    b.load_state_dict(a.state_dict())
    for epoch, v in enumerate(values[3:], start=3):
        if b.update(epoch, {"val_loss": v}):
            break
    assert ref_result == (8, 7)
    assert b.stopped_epoch == ref.stopped_epoch == 7 and b.best == ref.best == 0.7


def test_reset_allows_reuse():
    es = EarlyStopping(monitor="loss", patience=0)
    drive(es, [1.0, 2.0])
    assert es.stop_training
    es.reset()
    assert not es.stop_training and es.wait == 0 and es.best == math.inf and es.stopped_epoch == 0
