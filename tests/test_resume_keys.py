"""Callback states in last.pt are keyed by name (Callback.state_key), not by list position: a resume finds
them whatever progress display the run has, and on every rank of a DDP run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.config import from_dict
from cnnlab.errors import ConfigError, RunInterrupted
from cnnlab.experiments.run import run_experiment
from cnnlab.records.runs import RunFolder
from cnnlab.training.callbacks import (Callback, EarlyStopping, ModelCheckpoint, Monitor, callback_states,
                                       restore_states)
from conftest import subprocess_env

# Early stopping with a min_delta far above any change: epoch 1 is the only improvement, so an uninterrupted
# run stops after epoch 1 + patience = 4 and best.pt is epoch 1's, whatever the numbers. A resume that forgot
# the state would count epoch 3 as a new best, overwrite best.pt and run all 6 epochs.
BASE = {"name": "keys", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 160, "synthetic_test": 40},
        "model": {"name": "basenet"},
        "train": {"optimizer": "adam", "epochs": 6, "batch_size": 32, "precision": "fp32"},
        "early_stopping": {"enabled": True, "monitor": "val_loss", "patience": 3, "min_delta": 100.0}}


@pytest.fixture
def one_thread(monkeypatch):
    """Bitwise-equal histories need one thread count throughout (cnnlab.runtime.threads)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _states(trainer) -> dict:
    """The early-stopping and checkpoint states, by class name (comparable across runs)."""
    return {type(c).__name__: {k: v for k, v in c.state_dict().items() if k != "best_weights"}
            for c in trainer.callbacks if isinstance(c, (EarlyStopping, ModelCheckpoint))}


class _Interrupt(Callback):
    """Ctrl-C after `epoch`, keeping the states last.pt was just written with."""

    def __init__(self, epoch: int):
        self.epoch, self.states = epoch, None

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            self.states = _states(trainer)
            raise KeyboardInterrupt


class _AtStart(Callback):
    def on_fit_start(self, trainer):
        self.states = _states(trainer)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("before, after", [("line", "none"), ("bar", "none"), ("none", "line")])
def test_resume_with_another_progress_display_keeps_early_stopping_and_best(tmp_path, one_thread, before, after):
    whole = run_experiment(from_dict(BASE), tmp_path / "whole", progress="none")
    assert whole.results.stopped_early and whole.results.epochs_run == 4 and whole.results.best_epoch == 1
    cut = _Interrupt(2)
    with pytest.raises(RunInterrupted) as e:
        run_experiment(from_dict(BASE), tmp_path / "cut", progress=before, callbacks=[cut])
    folder = RunFolder(Path(str(e.value)))
    start = _AtStart()
    resumed = run_experiment(from_dict(BASE), tmp_path / "cut", progress=after, resume=folder, callbacks=[start])
    assert start.states == cut.states                       # restored, not started afresh
    assert start.states["EarlyStopping"]["wait"] == 1 and start.states["ModelCheckpoint"]["best_epoch"] == 1
    assert _strip(resumed.history) == _strip(whole.history)
    for key in ("stopped_early", "epochs_run", "best_epoch", "test_accuracy", "test_loss"):
        assert getattr(resumed.results, key) == getattr(whole.results, key), key
    best = torch.load(folder.checkpoints / "best.pt", weights_only=True, map_location="cpu")
    assert best["epoch"] == 1                                # not overwritten by a worse epoch after the resume
    saved = torch.load(folder.checkpoints / "last.pt", weights_only=False, map_location="cpu")["callbacks"]
    assert set(saved) == {"EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}",
                          "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}"}


def test_checkpoints_keyed_by_position_still_resume_by_class_name():
    """last.pt files written before state keys ("<position>:<class>") are matched by class name, in order."""
    saved = {"0:PrintLogger": {}, "1:EarlyStopping": {"wait": 2, "best": 0.5, "best_epoch": 1},
             "2:ModelCheckpoint": {"best": 0.5, "best_epoch": 2}, "3:HistoryWriter": {},
             "4:EarlyStopping": {"wait": 1, "best": 0.9, "best_epoch": 3}}
    first, second = EarlyStopping(), EarlyStopping(monitor="val_accuracy")
    ckpt = ModelCheckpoint(None, Monitor("val_loss"))
    restore_states([ckpt, first, second], saved)             # no progress callback now: other positions
    assert (first.wait, first.best, first.best_epoch) == (2, 0.5, 1)
    assert (second.wait, second.best, second.best_epoch) == (1, 0.9, 3)
    assert (ckpt.best, ckpt.best_epoch) == (0.5, 2)


def test_two_callbacks_with_one_state_key_are_refused_and_different_settings_are_told_apart():
    with pytest.raises(ConfigError, match="EarlyStopping.*val_loss"):
        restore_states([EarlyStopping(), EarlyStopping(patience=3)], None)
    by_loss, by_acc = EarlyStopping(), EarlyStopping(monitor="val_accuracy")
    by_loss.wait, by_acc.wait = 4, 7
    saved = callback_states([by_loss, by_acc, Callback()])
    assert len(saved) == 2                                  # stateless callbacks save nothing
    again_acc, again_loss = EarlyStopping(monitor="val_accuracy"), EarlyStopping()
    restore_states([again_acc, again_loss], saved)          # in another order: each gets its own
    assert (again_loss.wait, again_acc.wait) == (4, 7)


def test_a_callback_that_finds_no_saved_state_says_so():
    with pytest.warns(UserWarning, match="no state for EarlyStopping"):
        restore_states([EarlyStopping()], {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {"best": 1.0}})


# ---------------------------------------------------------------- under DDP

DDP_SCRIPT = r'''
"""Uninterrupted, interrupted after epoch 2, then resumed: on every rank (rank 0 shows lines, the others
nothing), each rank writing what it saw to OUT/<what>-<rank>.json."""
import json, sys
from pathlib import Path
from cnnlab.config import from_dict
from cnnlab.errors import RunInterrupted
from cnnlab.experiments.run import run_experiment
from cnnlab.records.runs import RunFolder
from cnnlab.runtime import distributed
from cnnlab.training.callbacks import Callback, EarlyStopping, ModelCheckpoint

base, out = json.loads(sys.argv[1]), Path(sys.argv[2])
rank = distributed.init_from_env().rank

def states(trainer):
    return {type(c).__name__: {k: v for k, v in c.state_dict().items() if k != "best_weights"}
            for c in trainer.callbacks if isinstance(c, (EarlyStopping, ModelCheckpoint))}

def write(what, obj):
    (out / f"{what}-{rank}.json").write_text(json.dumps(obj))

class Interrupt(Callback):
    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == 2:
            write("cut", states(trainer))
            raise KeyboardInterrupt

class AtStart(Callback):
    def on_fit_start(self, trainer):
        write("start", states(trainer))          # before any collective: readable even if the ranks disagree later

whole = run_experiment(from_dict(base), out / "whole", progress="line")
write("whole", {"epochs": len(whole.history), "stopped_early": whole.results.stopped_early})
try:
    run_experiment(from_dict(base), out / "cut", progress="line", callbacks=[Interrupt()])
except RunInterrupted as e:
    path = distributed.broadcast_object(str(e.path))
resumed = run_experiment(from_dict(base), out / "cut", progress="line", resume=RunFolder(Path(path)),
                         callbacks=[AtStart()])
write("resumed", {"epochs": len(resumed.history), "stopped_early": resumed.results.stopped_early})
distributed.shutdown()
'''


def test_every_ddp_rank_resumes_its_early_stopping_state(tmp_path):
    """Ranks > 0 have no progress callback: with states keyed by position they started early stopping
    afresh, stopped on other epochs than rank 0, and the run hung in mismatched collectives."""
    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_SCRIPT)
    base = {**BASE, "data": {**BASE["data"], "synthetic_train": 256, "synthetic_test": 64}}
    env = subprocess_env(tmp_path / "home", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), json.dumps(base), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        output, hung = proc.communicate(timeout=240)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                  # torchrun and its two workers
        output, hung = proc.communicate()[0], True
    read = lambda what, r: json.loads((tmp_path / f"{what}-{r}.json").read_text())  # noqa: E731
    cut, start = read("cut", 0), [read("start", r) for r in (0, 1)]
    assert start[0] == cut and start[1] == cut, (cut, start)  # rank 1 restored rank 0's saved state too
    assert not hung and proc.returncode == 0, output[-3000:]
    whole = [read("whole", r) for r in (0, 1)]
    resumed = [read("resumed", r) for r in (0, 1)]
    assert whole[0] == whole[1] == {"epochs": 4, "stopped_early": True}
    assert resumed == whole
