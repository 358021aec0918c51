"""What a newcomer trips over (issue 28, items 4, 6, 7, 8): reports that average unrelated runs, unfinished runs
scored as finished, console lines cut short, and small traps (--version, dir(cnnlab), folders to predict)."""
from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab.config import from_dict
from cnnlab.errors import DataError, RunInterrupted
from cnnlab.experiments.run import run_experiment
from cnnlab.training.callbacks import Callback

from conftest import cli

CFG = {"name": "killed", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 200, "synthetic_test": 40},
       "model": {"name": "basenet"}, "train": {"optimizer": "adam", "epochs": 3, "batch_size": 50, "precision": "fp32"}}


class KillAfterFirstEpoch(Callback):
    """Ctrl-C once the first epoch (and its checkpoint) is saved: the run folder of a run killed at epoch 1."""

    def on_epoch_end(self, trainer, logs):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(RunInterrupted):
        run_experiment(from_dict(CFG), runs, progress="none", callbacks=[KillAfterFirstEpoch()])
    (path,) = runs.iterdir()
    assert (path / "checkpoints" / "last.pt").is_file() and not (path / "results.json").exists()
    return path


def copy_of(run: Path, tmp_path: Path, keep=("config.toml",)) -> Path:
    out = tmp_path / run.name
    out.mkdir()
    for name in keep:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / name, out / name)
    return out


# ---------------------------------------------------------------- item 6: unfinished runs

def test_evaluate_says_a_killed_run_is_unfinished_and_records_the_file_it_scored(killed, tmp_path):
    proc = cli(["evaluate", killed, "--device", "cpu"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "killed [unfinished (epoch 1/3): scored checkpoints/last.pt of epoch 1] on its own data" in proc.stdout
    recorded = json.loads((killed / "eval-test" / "evaluation.json").read_text())
    assert (recorded["weights"], recorded["weights_file"], recorded["epoch"]) == ("last", "checkpoints/last.pt", 1)
    assert recorded["run_status"] == "unfinished (epoch 1/3)"


def test_run_status_says_where_a_run_stands(killed, tmp_path):
    run = cnnlab.Run(killed)
    assert run.status == "unfinished"
    assert (run.state.epochs_done, run.state.epochs_max, run.state.checkpoints) == (1, 3, ["best", "last"])
    assert "unfinished (epoch 1/3)" in repr(run)
    assert cnnlab.Run(copy_of(killed, tmp_path)).status == "not started"


def test_a_folder_with_only_its_config_points_to_resume_and_names_no_checkpoint(killed, tmp_path):
    bare = copy_of(killed, tmp_path)
    proc = cli(["evaluate", bare], tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr == (f"cnnlab: error: {bare}: no checkpoint yet (the run stopped before its first epoch ended, "
                           f"or is still in it): resume it with cnnlab run --resume {bare}\n")


def test_a_missing_weights_file_suggests_only_the_one_that_exists(killed, tmp_path):
    only_best = copy_of(killed, tmp_path, ("config.toml", "classes.json", "preprocess.json", "checkpoints/best.pt"))
    proc = cli(["evaluate", only_best, "--weights", "last"], tmp_path / "home")
    assert proc.returncode == 2 and "use --weights best" in proc.stderr and "--weights last" not in proc.stderr
    # auto on an unfinished run scores the latest weights there are: here, best
    assert cnnlab.load(only_best).weights == "best"


def test_resume_of_a_folder_without_checkpoint_starts_the_run_over_in_it(killed, tmp_path):
    bare = copy_of(killed, tmp_path)
    text = (bare / "config.toml").read_text()
    (bare / "config.toml").write_text(text.replace("epochs = 3\n", "epochs = 1\n"))   # one epoch is enough here
    proc = cli(["run", "--resume", bare, "-q", "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "starting the run over from epoch 1 in the same folder" in proc.stdout
    assert cnnlab.Run(bare).status == "ok" and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- item 8: small traps

def test_version_flag_prints_the_installed_version(capsys):
    from cnnlab.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"cnnlab {version('cnnlab')}\n"
    assert cnnlab.__version__ == version("cnnlab")


def test_dir_lists_the_lazy_api_for_tab_completion():
    assert {"run", "suite", "load", "Run", "Suite", "Model", "load_model", "export_run"} <= set(dir(cnnlab))


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    return paths


def test_model_predict_reads_a_folder_as_the_cli_does(killed, tmp_path):
    paths = _images(tmp_path / "imgs" / "sub", 3)
    model = cnnlab.load(killed)
    assert model.predict(tmp_path / "imgs", topk=2) == model.predict(sorted(paths), topk=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in this folder"):
        model.predict(str(tmp_path / "empty"))


def test_predict_on_an_empty_folder_says_so_and_fails(killed, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli(["predict", killed, tmp_path / "empty"], tmp_path / "home")
    assert proc.returncode == 1
    assert f"cnnlab: cannot predict {tmp_path / 'empty'}: no image files in this folder or below" in proc.stderr


def test_counts_agree_with_their_number(tmp_path, capsys):
    from cnnlab.config import load_config
    from cnnlab.errors import ConfigError
    from cnnlab.experiments.run import say_result
    from cnnlab.records.runs import Results
    say_result(Results(name="one", status="ok", epochs_run=1, test_accuracy=0.5, test_loss=1.0, seconds=2.0), tmp_path)
    assert "(1 epoch, 2.0s)" in capsys.readouterr().out
    p = tmp_path / "c.toml"
    p.write_text("[train]\nepochs = 'ten'\n")
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        load_config(p)


# ---------------------------------------------------------------- item 7: the console

def test_the_end_of_epoch_line_shows_every_metric_in_full(capsys):
    import types

    import torch

    from cnnlab.training.callbacks import ProgressBar
    trainer = types.SimpleNamespace(phase="train", epoch=19, cfg=types.SimpleNamespace(epochs=20), train_size=45_000,
                                    steps_per_epoch=704)
    bar = ProgressBar("bnpost-seed2")
    bar.on_epoch_start(trainer)
    bar.on_batch_end(trainer, 45_000, torch.tensor(1.0))
    bar.on_epoch_end(trainer, {"epoch": 20, "loss": 0.61234, "accuracy": 0.80012, "val_loss": 1.01234,
                               "val_accuracy": 0.65432, "seconds": 12.34})
    (line,) = capsys.readouterr().out.splitlines()     # printed, so a terminal wraps it instead of cutting it
    assert line == ("bnpost-seed2 epoch 20/20: loss 0.6123  accuracy 0.8001  val_loss 1.0123  val_accuracy 0.6543"
                    "  12.3s")
    assert len(line) <= 120


def test_a_suite_prints_one_line_per_row_not_its_layer_table_unless_verbose(tmp_path):
    from conftest import synthetic_row
    d = tmp_path / "suite"
    d.mkdir()
    (d / "01_a.toml").write_text(synthetic_row("a", 0.001, 1))
    quiet = cli(["suite", d, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    verbose = cli(["suite", d, "--runs-dir", tmp_path / "runs", "-v"], tmp_path / "home")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    table = next((tmp_path / "runs").rglob("summary.txt")).read_text().strip()
    counts = [line for line in table.splitlines() if line.startswith(("Total params", "Trainable params"))]
    assert "Layer (type)" not in quiet.stdout
    assert f"basenet: {counts[0]}, {counts[1]} (the layer table: summary.txt, or -v)" in quiet.stdout
    assert table in verbose.stdout


def tiny_backbone():
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 32, 32)}
    net.num_features = 6
    return net


def test_a_frozen_backbone_run_counts_only_its_head_as_trainable():
    from cnnlab.experiments.prepare import prepare
    cfg = from_dict({"name": "frozen", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 80,
                                                "synthetic_test": 20},
                     "model": {"name": "test_newcomer:tiny_backbone", "weights": "none"},
                     "train": {"freeze_backbone": True, "batch_size": 8}})
    plan = prepare(cfg, progress="none")
    assert plan.frozen
    head = sum(p.numel() for p in plan.trained.parameters())
    total = sum(p.numel() for p in plan.model.parameters())
    assert 0 < head < total
    assert f"Trainable params: {head:,}\n" in plan.table and f"Non-trainable params: {total - head:,}" in plan.table


# ---------------------------------------------------------------- item 4: the report's grouping

def _run_folder(root: Path, n: int, cfg, acc: float, data: str, source: Path | None = None) -> None:
    """A finished run folder as a run writes it (config.toml, meta.json, results.json), without training."""
    from cnnlab.config import to_dict
    from cnnlab.records.io import write_json
    from cnnlab.records.runs import Results, RunFolder
    run = RunFolder(root / f"{n:02d}-{cfg.name}-seed{cfg.seed}")
    run.path.mkdir(parents=True)
    resolved = to_dict(cfg)
    resolved["train"]["lr"] = cfg.train.effective_lr
    run.write_config(resolved)
    write_json(run.path / "meta.json", {"data": data, "splits": {"train": 1800, "val": 200, "test": 500},
                                        "source": str(source or "<config>"), "device": "cpu"})
    run.write_results(Results(name=cfg.name, status="ok", label=cfg.report.label or cfg.name, model=cfg.model.name,
                              optimizer=cfg.train.optimizer, seed=cfg.seed, epochs_max=cfg.train.epochs,
                              epochs_run=cfg.train.epochs, test_accuracy=acc, test_loss=1.0,
                              reference_accuracy=cfg.report.reference_accuracy).to_json())


def _table_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]


def test_the_report_groups_only_runs_whose_config_differs_in_the_seed_and_shows_each_data(tmp_path):
    from cnnlab.records.report import build_report
    base = {"name": "adam20", "data": {"source": "synthetic", "classes": 10}, "report": {"label": "BaseNet, Adam"},
            "train": {"optimizer": "adam", "epochs": 2}}
    synth = "synthetic: 2000 train / 500 test images, 10 classes, 32x32"
    photos = "photos: 40 train / 10 test images, 2 classes, 64x64"
    _run_folder(tmp_path, 1, from_dict({**base, "seed": 0}), 0.50, synth)
    _run_folder(tmp_path, 2, from_dict({**base, "seed": 1, "device": "cpu"}), 0.70, synth)   # a seed of the same
    _run_folder(tmp_path, 3, from_dict({**base, "train": {"optimizer": "adam", "epochs": 3}}), 0.60, synth)
    _run_folder(tmp_path, 4, from_dict({**base, "data": {"source": "imagefolder", "data_dir": "photos",
                                                          "classes": 0}}), 0.95, photos)
    report = build_report(tmp_path)
    rows = _table_rows(report)
    assert len(rows) == 3
    assert rows[0].startswith("| BaseNet, Adam [train.epochs = 2] (n=2) |") and "0.6000 ± 0.1414" in rows[0]
    assert rows[1].startswith("| BaseNet, Adam [train.epochs = 3] |") and "| 0.6000 |" in rows[1]
    assert rows[2].startswith("| BaseNet, Adam |") and "| 0.9500 |" in rows[2]     # alone in its data's table
    split = "; split 1,800 train / 200 validation / 500 test."
    lines = report.splitlines()
    assert lines.index(f"Data: {synth}{split}") < lines.index(rows[0]) < lines.index(rows[1]) \
        < lines.index(f"Data: {photos}{split}") < lines.index(rows[2])


def test_a_label_or_reference_that_no_longer_applies_is_marked(tmp_path):
    from cnnlab.config import load_config, read_data_preset
    from cnnlab.configs import config_file
    from cnnlab.records.report import build_report
    recipe = config_file("practice/03_adam20")
    as_packaged = load_config(recipe)
    shortened = load_config(recipe, [("train.epochs", 3)], read_data_preset("synthetic"))
    _run_folder(tmp_path, 1, as_packaged, 0.41, "cifar100: 50000 train / 10000 test images, 25 classes, 32x32", recipe)
    _run_folder(tmp_path, 2, shortened, 0.30, "synthetic: 2000 train / 500 test images, 10 classes, 32x32", recipe)
    report = build_report(tmp_path)
    packaged, short = _table_rows(report)
    assert packaged.startswith("| BaseNet, Adam, 20 epochs |") and "| 0.4068 | ok |" in packaged
    assert short.startswith("| BaseNet, Adam, 20 epochs (shortened: 3 of 20 epochs; other data (source synthetic "
                            "instead of cifar100, classes 10 instead of 25)) |")
    assert "| 0.4068 (not comparable) | ok |" in short
    assert "## Rows that are no longer their packaged recipe" in report


def test_a_users_file_based_on_a_recipe_is_marked_when_it_changes_the_data_but_not_when_it_relabels(tmp_path):
    """`base = "practice/03_adam20"` in a user's file inherits the recipe's label and reference accuracy: on other
    data they no longer apply. A file that sets its own [report] label owns it."""
    from cnnlab.config import load_config
    from cnnlab.records.report import build_report
    inherits = tmp_path / "imbalanced.toml"
    inherits.write_text('base = "practice/03_adam20"\nname = "imb"\n[data]\nsource = "cifar10"\nclasses = 0\n')
    relabels = tmp_path / "mine.toml"
    relabels.write_text('base = "practice/03_adam20"\nname = "mine"\n[data]\nsource = "cifar10"\nclasses = 0\n'
                        '[report]\nlabel = "my BaseNet on CIFAR-10"\nreference_accuracy = 0.5\n')
    data = "cifar10: 50000 train / 10000 test images, 10 classes, 32x32"
    _run_folder(tmp_path / "runs", 1, load_config(inherits), 0.45, data, inherits)
    _run_folder(tmp_path / "runs", 2, load_config(relabels), 0.46, data, relabels)
    first, second = _table_rows(build_report(tmp_path / "runs"))
    assert first.startswith("| BaseNet, Adam, 20 epochs (other data (source cifar10 instead of cifar100, classes 0 "
                            "instead of 25)) |") and "| 0.4068 (not comparable) |" in first
    assert second.startswith("| my BaseNet on CIFAR-10 |") and "| 0.5000 |" in second
