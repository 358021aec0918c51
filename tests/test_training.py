"""The training loop's joints: schedules, optimizer groups, one definition of "best", callbacks,
the rank-aware recorder and file modes. Scripted metric sequences where no training is needed."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.training.callbacks import Callback, EarlyStopping, ModelCheckpoint, Monitor, make_monitor
from cnnlab.config import CheckpointConfig, EarlyStoppingConfig, TrainConfig, from_dict
from cnnlab.models.parts import BackboneModel
from cnnlab.training.engine import lr_factor, make_optimizer, param_groups
from cnnlab.experiments.run import run_experiment
from cnnlab.records.runs import RunFolder, RunRecorder


# ---------------------------------------------------------------- lr schedules

def test_lr_factor_constant_with_and_without_warmup():
    assert [lr_factor(TrainConfig(), s, 100, 10) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    cfg = TrainConfig(warmup_epochs=2, epochs=10)
    assert [lr_factor(cfg, s, 100, 10) for s in (0, 9, 19, 20, 99)] == [pytest.approx(0.05), pytest.approx(0.5),
                                                                          1.0, 1.0, 1.0]


def test_lr_factor_cosine_reaches_zero_at_the_last_step():
    cfg = TrainConfig(schedule="cosine", warmup_epochs=1, epochs=5)
    f = [lr_factor(cfg, s, 50, 10) for s in range(50)]
    assert f[9] == pytest.approx(1.0)                                   # end of warmup
    assert f[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 40)))  # first step after it
    assert f[29] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert f[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))                  # decreasing after warmup


def test_lr_factor_onecycle_is_linear_up_then_linear_down():
    cfg = TrainConfig(schedule="onecycle", warmup_epochs=2, epochs=4)
    f = [lr_factor(cfg, s, 40, 10) for s in range(40)]
    assert f[:20] == [pytest.approx((s + 1) / 20) for s in range(20)]
    assert f[20:] == [pytest.approx(1 - (s + 1) / 20) for s in range(20)]
    assert f[-1] == 0.0


# ---------------------------------------------------------------- optimizer groups

def _bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))


def test_no_weight_decay_on_batchnorm_and_biases():
    model = _bn_net()
    groups = param_groups(model, TrainConfig(weight_decay=5e-4))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[4].weight)}
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[4].bias)}
    assert {g["weight_decay"] for g in groups} == {0.0, 5e-4}


def test_decay_norm_and_bias_switch_decays_everything():
    model = _bn_net()
    groups = param_groups(model, TrainConfig(weight_decay=5e-4, decay_norm_and_bias=True))
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


class _Transfer(BackboneModel):          # says it is a backbone with a head (cnnlab.models.parts)
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)


def test_backbone_groups_get_the_lower_lr_and_every_parameter_one_group():
    model = _Transfer()
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, backbone_lr_mult=0.1, weight_decay=1e-4))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(by_param) == len(list(model.parameters()))              # none missing, none twice
    assert by_param[id(model.backbone[0].weight)]["lr"] == pytest.approx(0.01)
    assert by_param[id(model.backbone[1].bias)]["lr"] == pytest.approx(0.01)
    assert by_param[id(model.backbone[1].bias)]["weight_decay"] == 0
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(model.head.weight)]["weight_decay"] == pytest.approx(1e-4)


# ---------------------------------------------------------------- one definition of "best"

class _FakeTrainer:
    """What ModelCheckpoint reads from a trainer: epoch, model, cfg.epochs, diverged, stop_training."""

    def __init__(self, epochs: int):
        self.epoch, self.cfg, self.diverged, self.stop_training = 0, TrainConfig(epochs=epochs), False, False
        self.model = nn.Linear(1, 1)

    def state_dict(self):
        return {"epoch": self.epoch}


class _Recorder:
    def __init__(self):
        self.saved = []

    def save_checkpoint(self, name, obj):
        self.saved.append((name, obj["epoch"]))


def _drive(callbacks, values: list[float], monitor: str):
    trainer = _FakeTrainer(len(values))
    for v in values:
        trainer.epoch += 1
        for c in callbacks:
            c.on_epoch_end(trainer, {monitor: v, "loss": 1.0})
        if trainer.stop_training:
            break
    return trainer


@pytest.mark.parametrize("mode, min_delta, values", [
    ("max", 0.0, [0.50, 0.60, 0.59, 0.61, 0.60, 0.55]),
    ("max", 0.02, [0.50, 0.60, 0.61, 0.615, 0.62, 0.60]),     # +0.01 steps are not improvements
    ("min", 0.0, [0.50, 0.40, 0.45, 0.39, 0.60, 0.70]),
])
def test_best_checkpoint_and_early_stopping_agree(mode, min_delta, values):
    es_cfg = EarlyStoppingConfig(enabled=True, monitor="val_accuracy", mode=mode, min_delta=min_delta, patience=10)
    stopper = EarlyStopping.from_config(es_cfg)
    rec = _Recorder()
    ckpt = ModelCheckpoint(rec, make_monitor(es_cfg, CheckpointConfig(), True))
    _drive([stopper, ckpt], values, "val_accuracy")
    assert ckpt.best_epoch == stopper.best_epoch + 1
    assert [e for n, e in rec.saved if n == "best.pt"][-1] == ckpt.best_epoch


def test_min_delta_decides_best_checkpoint():
    es_cfg = EarlyStoppingConfig(enabled=True, monitor="val_accuracy", mode="max", min_delta=0.05, patience=10)
    ckpt = ModelCheckpoint(_Recorder(), make_monitor(es_cfg, CheckpointConfig(), True))
    _drive([ckpt], [0.50, 0.53, 0.56, 0.54], "val_accuracy")
    assert ckpt.best_epoch == 3          # 0.53 is within min_delta of 0.50; 0.56 is not


def test_checkpoint_table_decides_when_early_stopping_is_off():
    monitor = make_monitor(EarlyStoppingConfig(), CheckpointConfig(monitor="val_loss", mode="min"), True)
    ckpt = ModelCheckpoint(_Recorder(), monitor)
    _drive([ckpt], [0.9, 0.5, 0.7, 0.6], "val_loss")
    assert ckpt.best_epoch == 2
    # the mode is the table's, not a guess from the metric's name
    monitor = make_monitor(EarlyStoppingConfig(), CheckpointConfig(monitor="val_loss", mode="max"), True)
    ckpt = ModelCheckpoint(_Recorder(), monitor)
    _drive([ckpt], [0.9, 0.5, 0.7, 0.6], "val_loss")
    assert ckpt.best_epoch == 1


def test_default_best_is_val_accuracy_then_training_accuracy_without_validation():
    assert make_monitor(EarlyStoppingConfig(), CheckpointConfig(), True) == Monitor("val_accuracy", "max")
    assert make_monitor(EarlyStoppingConfig(), CheckpointConfig(), False).name == "accuracy"


def test_last_checkpoint_every_n_and_at_the_final_epoch():
    rec = _Recorder()
    ckpt = ModelCheckpoint(rec, Monitor("val_accuracy", "max"), every=3)
    _drive([ckpt], [0.1] * 7, "val_accuracy")
    assert [e for n, e in rec.saved if n == "last.pt"] == [3, 6, 7]


# ---------------------------------------------------------------- runs: callbacks, phases, recorder

def _synthetic(**train) -> dict:
    return {"name": "cb", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 200, "synthetic_test": 40},
            "model": {"name": "basenet"},
            "train": {"optimizer": "adam", "epochs": 3, "batch_size": 32, "precision": "fp32", **train}}


class LrLogger(Callback):
    """The README's example: one line per epoch with the learning rate."""

    def __init__(self, path: Path):
        self.path = path

    def on_epoch_end(self, trainer, logs):
        with open(self.path, "a") as f:
            f.write(f"{logs['epoch']} {logs['lr']:.6g}\n")


def test_user_callback_from_the_python_api(tmp_path):
    log = tmp_path / "lr.txt"
    cfg = from_dict(_synthetic(schedule="cosine", lr=0.01, epochs=3))
    out = run_experiment(cfg, tmp_path / "runs", progress="none", callbacks=[LrLogger(log)])
    lines = log.read_text().split()
    assert lines[0::2] == ["1", "2", "3"]
    history = json.loads((out.path / "history.json").read_text())
    assert [float(x) for x in lines[1::2]] == [pytest.approx(h["lr"]) for h in history]
    assert float(lines[-1]) == pytest.approx(0.0, abs=1e-9)            # cosine ends at 0


@pytest.fixture
def one_thread(monkeypatch):
    """Bitwise equality needs one thread count throughout: pin it, as OMP_NUM_THREADS would (cnnlab.runtime.threads)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads_before)


def _assert_resumes_exactly(base: dict, tmp_path: Path, out, after: int) -> None:
    """The run of `base`, interrupted after epoch `after` and resumed, gives `out`'s history and test accuracy
    (last.pt is written before user callbacks run)."""
    from cnnlab.errors import RunInterrupted
    with pytest.raises(RunInterrupted) as e:
        run_experiment(from_dict(base), tmp_path / "killed", progress="none", callbacks=[_InterruptAfter(after)])
    resumed = run_experiment(from_dict(base), tmp_path / "killed", progress="none", resume=RunFolder(Path(str(e.value))))
    strip = lambda h: [{k: v for k, v in x.items() if k != "seconds"} for x in h]  # noqa: E731
    assert strip(resumed.history) == strip(out.history)
    assert resumed.results.test_accuracy == out.results.test_accuracy


def test_one_schedule_across_head_and_main_phases_and_on_resume(tmp_path, one_thread):
    base = {"name": "ph", "data": {"source": "synthetic", "classes": 4, "image_size": 40, "synthetic_train": 160,
                                   "synthetic_test": 40},
            "model": {"name": "test_resnet", "weights": "none", "head": [8], "input_size": 32},
            "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 4, "batch_size": 32,
                      "precision": "fp32", "schedule": "cosine", "warmup_epochs": 1, "head_epochs": 2,
                      "backbone_lr_mult": 0.1}}
    out = run_experiment(from_dict(base), tmp_path / "runs", progress="none")
    lrs = [h["lr"] for h in out.history]
    assert lrs[0] == pytest.approx(0.05)               # warmup ended with epoch 1: once, not again in epoch 3
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]           # one cosine over all 4 epochs, head phase included
    assert lrs[3] == pytest.approx(0.0, abs=1e-12)
    # interrupted after epoch 3 (inside the main phase), then resumed: the same learning rates and metrics
    _assert_resumes_exactly(base, tmp_path, out, after=3)


def test_alternating_flips_resume_exactly(tmp_path, one_thread):
    """The alternating flips come from the seed and the epoch, the order from the saved generator: a run
    interrupted after epoch 2 and resumed trains exactly as the uninterrupted one."""
    base = {"name": "alt", "data": {"source": "synthetic", "classes": 3, "image_size": 16, "synthetic_train": 96,
                                    "synthetic_test": 24},
            "model": {"name": "airnet", "args": {"widths": [6, 8]}},
            "train": {"optimizer": "sgd", "lr": 0.05, "epochs": 4, "batch_size": 8, "precision": "fp32"},
            "augment": {"hflip": True, "alternate_flip": True, "crop_padding": 2}}
    out = run_experiment(from_dict(base), tmp_path / "runs", progress="none")
    assert len(out.history) == 4
    _assert_resumes_exactly(base, tmp_path, out, after=2)


class _InterruptAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_non_main_rank_recorder_writes_nothing(tmp_path):
    rec = RunRecorder(None)
    rec.write_json("x.json", {"a": 1})
    rec.write_text("t.txt", "hi")
    rec.save_checkpoint("last.pt", {"model": {}})
    rec.write_history([{"epoch": 1}])
    assert rec.path is None and not rec.active and list(tmp_path.iterdir()) == []


def test_atomic_files_keep_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import cnnlab.records.io as runs
        importlib.reload(runs)                 # the mode is read from the umask once, at import
        runs.write_json(tmp_path / "r.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
        os.umask(0o002)
        importlib.reload(runs)
        runs.write_json(tmp_path / "g.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "g.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)
        importlib.reload(runs)


class _Boom(Callback):
    def on_epoch_end(self, trainer, logs):
        raise RuntimeError("boom in a callback")


def test_trackers_are_closed_when_a_run_raises(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = from_dict({**_synthetic(), "tracking": {"loggers": ["mlflow"]}})
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(cfg, tmp_path / "runs", progress="none", callbacks=[_Boom()])
    assert mlflow.active_run() is None          # the next row of a suite starts clean


# ---------------------------------------------------------------- splits and views

def test_a_split_that_leaves_classes_without_training_images_warns_and_marks_the_row(tmp_path, capsys):
    # Records sorted by class (as CUB's lists are): Keras's "last 10%" holds out whole classes.
    cfg = from_dict({"name": "sorted", "data": {"source": "synthetic", "classes": 10, "synthetic_train": 200,
                                                "synthetic_test": 50, "val_split": "last", "val_fraction": 0.2},
                     "model": {"name": "basenet"}, "train": {"optimizer": "adam", "epochs": 1, "batch_size": 16,
                                                             "precision": "fp32"}})
    from cnnlab.data import load_dataset
    ds = load_dataset(cfg.data)
    order = torch.argsort(ds.y_train, stable=True)           # make the records class-sorted
    from cnnlab.data import Dataset
    from cnnlab.experiments.plan import DataCache

    class SortedCache(DataCache):
        def get(self, data_cfg, quiet):
            return Dataset(ds.x_train[order], ds.y_train[order], ds.x_test, ds.y_test, ds.classes, ds.name)

    out = run_experiment(cfg, tmp_path / "runs", progress="line", data_cache=SortedCache())
    said = capsys.readouterr().out
    warning = [line for line in said.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 of 10 classes have no training images" in warning[0]
    assert "val_split = 'last'" in warning[0]
    assert out.results.warnings and "no training images" in out.results.warnings[0]
    from cnnlab.records.report import build_report
    report = build_report(tmp_path / "runs")
    assert "ok ⚠" in report and "## Warnings" in report
    # a stratified split of the same data says nothing
    cfg.data.val_split = "stratified"
    out = run_experiment(cfg, tmp_path / "runs2", progress="line", data_cache=SortedCache())
    assert "warning:" not in capsys.readouterr().out and out.results.warnings == []


def test_training_and_evaluation_views_have_the_networks_input_size():
    """Images stored larger than the network input (CUB: 256 for 224): every augmentation feeds input_size."""
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import AugmentConfig
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.training.engine import Trainer
    x = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    for aug in (AugmentConfig(), AugmentConfig(zoom=0.2, hflip=True), AugmentConfig(crop_padding=4),
                AugmentConfig(random_resized_crop=True, hflip=True)):
        tr = Trainer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 40 * 40, 2)), TrainConfig(precision="fp32"), torch.device("cpu"),
                     0, Preprocess(48, 40, eval_crop=0.875), augmenter=Augmenter(aug, 40))
        assert tr._prepare(x, train=True).shape[-2:] == (40, 40), aug
        assert tr._prepare(x, train=False).shape[-2:] == (40, 40), aug


def test_progressive_resizing_trains_small_first_and_always_evaluates_at_full_size():
    """The network sees 16, then 24, then 32 px images in training; validation and test are always 32 px."""
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import AugmentConfig
    from cnnlab.training.engine import Batches, Trainer, fit
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append((self.training, x.shape[-1]))
            return x
    model = nn.Sequential(Record(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    g = torch.Generator().manual_seed(0)
    data = Batches(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 2, (8,), generator=g))
    aug = Augmenter(AugmentConfig(hflip=True, resize_from=16, resize_until=3))
    tr = Trainer(model, TrainConfig(precision="fp32", epochs=4, batch_size=4), torch.device("cpu"), 0, augmenter=aug)
    fit(tr, data, data)
    train_sides = [side for training, side in seen if training]
    assert train_sides == [16, 16, 24, 24, 32, 32, 32, 32]          # 2 batches an epoch
    assert {side for training, side in seen if not training} == {32}
    seen.clear()
    tr.evaluate(data, tta=True)
    assert seen and all(side == 32 for _, side in seen)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    """airbench's alternating flip: a seed-fixed half mirrored in even epochs, the other half in odd ones."""
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import AugmentConfig
    from cnnlab.training.engine import Batches, Trainer, fit
    seen = []

    class Record(nn.Module):
        """Image i holds the pixels (2i, 2i + 1): it is mirrored when the left one is the larger."""
        def forward(self, x):
            if self.training:
                px = (x.flatten(1) * 255).round().long()
                seen.extend(zip((px.min(1).values // 2).tolist(), (px[:, 0] > px[:, 1]).tolist()))
            return x
    n = 40
    x = torch.stack([torch.arange(n) * 2, torch.arange(n) * 2 + 1], 1).to(torch.uint8).view(n, 1, 1, 2)
    data = Batches(x, torch.zeros(n, dtype=torch.long))

    def flips(seed, epochs=4, alternate=True):
        seen.clear()
        aug = Augmenter(AugmentConfig(hflip=True, alternate_flip=alternate))
        model = nn.Sequential(Record(), nn.Flatten(), nn.Linear(2, 2))
        tr = Trainer(model, TrainConfig(precision="fp32", epochs=epochs, batch_size=16), torch.device("cpu"), seed, augmenter=aug)
        fit(tr, data, Batches(x[:0], torch.zeros(0, dtype=torch.long)))
        per_epoch = [dict(seen[e * n:(e + 1) * n]) for e in range(epochs)]
        assert all(sorted(d) == list(range(n)) for d in per_epoch)          # each image once an epoch
        return torch.tensor([[d[i] for i in range(n)] for d in per_epoch])
    f = flips(0)
    assert 10 < int(f[0].sum()) < 30                                        # about half, at random
    assert torch.equal(f[1], ~f[0]) and torch.equal(f[2], f[0]) and torch.equal(f[3], ~f[0])
    assert torch.equal(flips(0), f) and not torch.equal(flips(1)[0], f[0])  # the seed fixes the half
    plain = flips(0, alternate=False)                                      # random flips do not alternate
    assert not torch.equal(plain[1], ~plain[0])


def test_alternate_flip_needs_hflip():
    from cnnlab.errors import ConfigError
    with pytest.raises(ConfigError, match="alternate_flip"):
        from_dict({"augment": {"alternate_flip": True}})


def test_random_resized_crop_with_zoom_or_padding_is_refused():
    from cnnlab.errors import ConfigError
    for extra in ({"zoom": 0.2}, {"crop_padding": 4}):
        with pytest.raises(ConfigError, match="random_resized_crop"):
            from_dict({"augment": {"random_resized_crop": True, **extra}})


def test_evaluation_batch_counts_32px_images_and_shrinks_for_larger_inputs():
    """eval_batch_size = 500 suits CIFAR; at 224 it would hold 500 images' activations (9 GB for ResNet50)."""
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.models import forward
    from cnnlab.training.engine import Batches, Trainer
    cfg = TrainConfig(batch_size=32, eval_batch_size=500, precision="fp32")
    tr = Trainer(nn.Linear(4, 2), cfg, torch.device("cpu"), 0)
    scoring = tr.scoring
    assert scoring.batch_size(32) == 500
    assert scoring.batch_size(64) == 125
    assert scoring.batch_size(224) == 32                  # never below the training batch
    assert scoring.batch_size(0) == 500                   # features
    # what forward.logits batches by: the network's input side (stored 32 px, network input 224: 224 counts)
    sizes = []
    net = lambda x: (sizes.append(len(x)), torch.zeros(len(x), 2))[1]   # noqa: E731
    imgs = Batches(torch.zeros(100, 3, 32, 32, dtype=torch.uint8), torch.zeros(100, dtype=torch.long))
    forward.logits(_Calls(net), Preprocess(32, 224), imgs, scoring, torch.device("cpu"))
    assert sizes == [32, 32, 32, 4]


class _Calls(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("exclude_1d", [True, False])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_decay_groups_follow_timms_rule(wd, exclude_1d):
    from timm.optim import param_groups_weight_decay
    from cnnlab.training.engine import decay_groups
    from cnnlab.models import create_model
    model = create_model("resnet9s", 10, width=4)
    model[0][0].requires_grad_(False)                      # frozen parameters belong to no group
    ours = [(g["weight_decay"], [id(p) for p in g["params"]]) for g in decay_groups(model, wd, exclude_1d)]
    timms = [(g["weight_decay"], [id(p) for p in g["params"]])
             for g in param_groups_weight_decay(model, wd, weight_decay_exclude_1d=exclude_1d)]
    assert ours == timms and sum(len(p) for _, p in ours) == sum(p.requires_grad for p in model.parameters())
