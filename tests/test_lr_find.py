"""`cnnlab lr-find`: the exponential learning-rate range test, fastai's `valley` suggestion, the trainer restored."""
from __future__ import annotations

import json
import math

import pytest

from conftest import cli, synthetic_row


def _config(tmp_path):
    path = tmp_path / "tiny.toml"
    text = synthetic_row("tiny", 0.001, 1).replace("synthetic_train = 400", "synthetic_train = 160")
    path.write_text(text.replace("[train]\n", "[train]\nthreads = 1\n"))
    return path


def test_valley_is_half_way_down_the_longest_fall():
    """fastai's rule on a hand-made curve: flat for 10 points, falling for 30 (to index 39), then rising. The
    longest strictly decreasing run is one flat point + the 30 falling ones (31 long, start 39 - 31 = 8), and the
    suggestion is at 8 + int(31/3) + int(31/3/2) = 8 + 10 + 5 = 23."""
    from cnnlab.tuning.lr_find import suggest, valley
    losses = [3.0] * 10 + [2.9 - 0.05 * i for i in range(30)] + [1.5 + 0.2 * i for i in range(20)]
    lrs = [1e-7 * 10 ** (i / 8) for i in range(len(losses))]
    assert valley(lrs, losses) == (lrs[23], 23)
    # suggest() judges the curve as fastai does: without the first steps//10 points and the last 5
    lr, idx = suggest(lrs, losses, steps=60)
    part = losses[6:-5]
    assert idx == 6 + valley(lrs[6:-5], part)[1] and lr == lrs[idx]
    # ... and without anything from the first non-finite loss on; too short a curve gives no suggestion
    assert suggest(lrs, losses[:30] + [math.nan] * 30, steps=60) == suggest(lrs[:30], losses[:30] + [9.0] * 5, 60)
    assert suggest(lrs[:8], losses[:8], steps=60) == (None, None)


def test_range_test_restores_the_trainer_exactly(tmp_path):
    """Weights, optimizer state, step counters and random streams are the same after the test as before."""
    import torch

    from cnnlab.config import load_config
    from cnnlab.tuning.lr_find import build_trainer, range_test
    trainer, plan = build_trainer(load_config(_config(tmp_path)), tmp_path, progress="none")
    trainer.train_epoch(plan.splits.train)                 # some optimizer state (Adam's moments) to keep
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = [v.clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    step, epoch, rng = trainer.step, trainer.epoch, torch.get_rng_state()
    shuffle, lr = trainer.shuffle_gen.get_state(), trainer.optimizer.param_groups[0]["lr"]

    result = range_test(trainer, plan.splits.train, start_lr=1e-6, end_lr=1.0, steps=30)
    assert 20 <= len(result.lrs) <= 30 and len(result.losses) == len(result.lrs)
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[10] == pytest.approx(1e-6 * 1e6 ** (10 / 30))
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(opt_before, [v for s in trainer.optimizer.state.values()
                                                              for v in s.values() if torch.is_tensor(v)]))
    assert (trainer.step, trainer.epoch, trainer.optimizer.param_groups[0]["lr"]) == (step, epoch, lr)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(trainer.shuffle_gen.get_state(), shuffle)
    # the weights moved during the test (so restoring them is what made them equal)
    assert result.losses[-1] != result.losses[0]


def test_lr_find_command_writes_the_figure_and_suggestion(tmp_path):
    proc = cli(["lr-find", _config(tmp_path), "--steps", 60, "--runs-dir", tmp_path / "runs", "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("tiny-lr-find-") and (folder / "lr_find.png").stat().st_size > 1000
    found = json.loads((folder / "lr_find.json").read_text())
    lrs, losses = found["lrs"], found["losses"]
    assert found["rule"] == "valley" and len(lrs) == len(losses) <= 60
    assert all(b / a == pytest.approx((10 / 1e-7) ** (1 / 60)) for a, b in zip(lrs, lrs[1:]))   # exponential
    assert found["suggestion"] == lrs[found["index"]] and 6 <= found["index"] < len(lrs) - 5
    assert f"suggested lr: {found['suggestion']:.2e}  (rule: valley" in proc.stdout
    assert found["stopped"] in proc.stdout and found["optimizer"] == "adam" and found["batch_size"] == 32


def test_lr_find_from_python(tmp_path):
    import cnnlab
    r = cnnlab.lr_find(_config(tmp_path), steps=40, out=tmp_path / "lf", progress="none", train={"batch_size": 16})
    assert r.path == tmp_path / "lf" and (r.path / "lr_find.png").is_file() and (r.path / "lr_find.json").is_file()
    assert r.extra["batch_size"] == 16 and r.suggestion is not None and 1e-7 <= r.suggestion <= 10


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "--steps 5: give 20 or more"),
    (["--start-lr", "1", "--end-lr", "0.1"], "needs 0 < --start-lr < --end-lr"),
])
def test_bad_range_is_one_line(tmp_path, args, message):
    proc = cli(["lr-find", _config(tmp_path), "--runs-dir", tmp_path / "runs", *args], tmp_path / "home")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()
