"""Config files: TOML -> validated dataclasses, --set overrides, and one clear ConfigError per mistake."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cnnlab.config import (Config, apply_overrides, default_lr, from_dict, load_config, to_dict)
from cnnlab.errors import CnnlabError, ConfigError

from conftest import cli

GOOD = """
name = "demo"
seed = 3

[data]
source = "synthetic"
classes = 10
val_fraction = 0.2
val_split = "last"
synthetic_train = 300

[model]
name = "deepnet"

[train]
optimizer = "adam"
lr = 0.002
epochs = 7
batch_size = 16
normalize = "featurewise"

[augment]
zoom = 0.2
hflip = true

[early_stopping]
enabled = true
monitor = "val_accuracy"
patience = 2
restore_best_weights = true

[report]
label = "Demo row"
reference_accuracy = 0.5
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


# ---------------------------------------------------------------- parsing

def test_parse_full_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, Config)
    assert cfg.name == "demo" and cfg.seed == 3
    assert cfg.data.source == "synthetic" and cfg.data.classes == 10
    assert cfg.data.val_fraction == 0.2 and cfg.data.val_split == "last"
    assert cfg.data.synthetic_train == 300
    assert cfg.model.name == "deepnet"
    assert cfg.train.optimizer == "adam" and cfg.train.lr == 0.002
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 16
    assert cfg.train.normalize == "featurewise"
    assert cfg.augment.zoom == 0.2 and cfg.augment.hflip is True
    es = cfg.early_stopping
    assert (es.enabled, es.monitor, es.patience, es.restore_best_weights) == (True, "val_accuracy", 2, True)
    assert cfg.report.label == "Demo row" and cfg.report.reference_accuracy == 0.5
    # untouched keys keep their defaults
    assert cfg.train.momentum == 0.0 and cfg.data.download is True and cfg.augment.crop_padding == 0


def test_name_defaults_to_file_stem(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nepochs = 2\n", name="my_experiment.toml"))
    assert cfg.name == "my_experiment"


def test_int_given_for_float_becomes_float(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nlr = 1\nmomentum = 0\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.momentum, float)


def test_round_trip_through_to_dict(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    again = from_dict(to_dict(cfg), "<roundtrip>")
    assert to_dict(again) == to_dict(cfg)


# ---------------------------------------------------------------- --set overrides

@pytest.mark.parametrize("override, getter, expected", [
    ("train.epochs=5", lambda c: c.train.epochs, 5),
    ("data.classes=[0,1,2]", lambda c: c.data.classes, [0, 1, 2]),
    ('data.classes=["apple", "bee"]', lambda c: c.data.classes, ["apple", "bee"]),
    ("augment.hflip=true", lambda c: c.augment.hflip, True),
    ("augment.zoom=0.3", lambda c: c.augment.zoom, 0.3),
    ("train.lr=0.5", lambda c: c.train.lr, 0.5),
    ("train.optimizer=sgd", lambda c: c.train.optimizer, "sgd"),       # bare word -> string
    ('model.name="basenet"', lambda c: c.model.name, "basenet"),
    ("model.head=[400, 200]", lambda c: c.model.head, [400, 200]),
    ("model.args={width = 16}", lambda c: c.model.args, {"width": 16}),
    ("early_stopping.baseline=0.7", lambda c: c.early_stopping.baseline, 0.7),
    ("seed=42", lambda c: c.seed, 42),
    ("name=other", lambda c: c.name, "other"),
    ("data.data_dir=/some/where", lambda c: c.data.data_dir, "/some/where"),
])
def test_set_overrides(tmp_path, override, getter, expected):
    cfg = load_config(write(tmp_path, GOOD), [override])
    assert getter(cfg) == expected


def test_set_overrides_apply_in_order_and_beat_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.epochs=5", "train.epochs=9", "augment.hflip=false"])
    assert cfg.train.epochs == 9 and cfg.augment.hflip is False


def test_data_preset_then_overrides(tmp_path):
    preset = {"data": {"source": "cifar10", "classes": 0, "max_train_per_class": 1250}}
    cfg = load_config(write(tmp_path, GOOD), ["data.max_train_per_class=7"], data_preset=(preset, "preset.toml"))
    assert cfg.data.source == "cifar10" and cfg.data.classes == 0
    assert cfg.data.max_train_per_class == 7
    assert cfg.data.val_split == "last"        # keys the preset does not name stay as in the file


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs", "KEY=VALUE"),
    ("nosuch.key=1", "nosuch"),
    ("train.nosuch=1", "nosuch"),
    ("train.epochs=ten", "epochs"),
    ("train.epochs=0", "epochs"),
])
def test_bad_overrides(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), [override])
    assert fragment in str(e.value)


def test_apply_overrides_on_dataclass():
    cfg = apply_overrides(Config(), ["train.batch_size=8", "data.classes=0"])
    assert cfg.train.batch_size == 8 and cfg.data.classes == 0


# ---------------------------------------------------------------- lr defaults

@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.01), ("adam", 0.001), ("adamw", 0.001)])
def test_lr_default_follows_optimizer(tmp_path, optimizer, lr):
    cfg = load_config(write(tmp_path, f'[train]\noptimizer = "{optimizer}"\n'))
    assert cfg.train.lr is None                     # validation fills nothing in
    assert cfg.train.effective_lr == pytest.approx(lr)
    assert default_lr(optimizer) == pytest.approx(lr)


def test_lr_default_resolved_after_overrides(tmp_path):
    p = write(tmp_path, '[train]\noptimizer = "sgd"\n')
    assert load_config(p).train.effective_lr == pytest.approx(0.01)
    assert load_config(p, ["train.optimizer=adam"]).train.effective_lr == pytest.approx(0.001)
    assert load_config(p, ["train.lr=0.3"]).train.effective_lr == pytest.approx(0.3)


def test_default_lr_applied_where_the_optimizer_is_made(tmp_path):
    from torch import nn

    from cnnlab.training.engine import make_optimizer
    for optimizer, lr in (("sgd", 0.01), ("adam", 0.001)):
        cfg = load_config(write(tmp_path, f'[train]\noptimizer = "{optimizer}"\n'))
        opt = make_optimizer(nn.Linear(3, 2), cfg.train)
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr)] * len(opt.param_groups)


def test_explicit_lr_is_kept(tmp_path):
    cfg = load_config(write(tmp_path, '[train]\noptimizer = "adam"\nlr = 0.05\n'))
    assert cfg.train.lr == pytest.approx(0.05)


# ---------------------------------------------------------------- errors

BAD_CASES = [
    # (toml text, key that must be named)
    ('colour = "red"\n', "colour"),                                        # unknown top-level key
    ("[train]\nepochz = 3\n", "epochz"),                                   # unknown key in a table
    ("[augment]\nflip = true\n", "flip"),
    ("[nosuch]\na = 1\n", "nosuch"),                                       # unknown table
    ('[train]\nepochs = "ten"\n', "epochs"),                               # wrong type
    ("[train]\nepochs = 2.5\n", "epochs"),
    ("[augment]\nhflip = 1\n", "hflip"),
    ('[train]\nlr = "fast"\n', "lr"),
    ("[data]\nclasses = true\n", "classes"),
    ("train = 5\n", "train"),                                              # a table given as a value
    ("[train]\nlr = 0\n", "lr"),                                           # out of range
    ("[train]\nlr = -0.1\n", "lr"),
    ("[train]\nepochs = 0\n", "epochs"),
    ("[augment]\nzoom = -0.1\n", "zoom"),
    ("[train]\nbatch_size = 0\n", "batch_size"),
    ("[data]\nval_fraction = 1.0\n", "val_fraction"),
    ("[data]\nval_fraction = 1.5\n", "val_fraction"),
    ("[data]\nval_fraction = -0.1\n", "val_fraction"),
    ('[data]\nval_split = "middle"\n', "val_split"),
    ('[train]\noptimizer = "rmsprop"\n', "optimizer"),
    ('[early_stopping]\nenabled = true\nmonitor = "val_acc"\n', "monitor"),
    ('[early_stopping]\nenabled = true\nmode = "up"\n', "mode"),
    ("[early_stopping]\npatience = -1\n", "patience"),
    ("[data]\nclasses = []\n", "classes"),
    ("[data]\nclasses = [0, 1.5]\n", "classes"),
    ("[model]\nhead = [0]\n", "head"),
    ("seed = -1\n", "seed"),
    ('device = "tpu"\n', "device"),
    ("[train]\nmomentum = 1.0\n", "momentum"),
    ("[data]\nmax_train_per_class = -1\n", "'max_train_per_class'"),
    ("[data]\nmax_test_per_class = -1\n", "'max_test_per_class'"),
    ("[data]\nsynthetic_train = 0\n", "'synthetic_train'"),
    ("[data]\nsynthetic_test = 0\n", "'synthetic_test'"),
]


@pytest.mark.parametrize("text, key", BAD_CASES, ids=[k + "-" + str(i) for i, (_, k) in enumerate(BAD_CASES)])
def test_config_errors_name_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text, name="bad_config.toml")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert key in msg, msg
    assert str(p) in msg, msg
    assert isinstance(e.value, CnnlabError)


def test_unknown_key_lists_known_keys(tmp_path):
    p = write(tmp_path, "[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="known keys:.*epochs"):
        load_config(p)


def test_wrong_type_message_says_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'epochs' must be an integer, got 'ten'"):
        load_config(write(tmp_path, '[train]\nepochs = "ten"\n'))
    with pytest.raises(ConfigError, match=r"'hflip' must be true or false, got 1"):
        load_config(write(tmp_path, "[augment]\nhflip = 1\n"))


def test_monitor_typo_is_an_error_even_while_early_stopping_is_off(tmp_path):
    """A choice is a Literal type: one check, whatever else the table says (a typo would bite when enabled)."""
    with pytest.raises(ConfigError, match="'monitor' must be one of loss, accuracy, val_loss, val_accuracy"):
        load_config(write(tmp_path, '[early_stopping]\nmonitor = "val_acc"\n'))


def test_val_monitor_without_validation_split(tmp_path):
    p = write(tmp_path, '[data]\nval_fraction = 0.0\n[early_stopping]\nenabled = true\nmonitor = "val_loss"\n')
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(p)


def test_invalid_toml_and_missing_file(tmp_path):
    p = write(tmp_path, "[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_config(p)
    assert str(p) in str(e.value)
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


# ---------------------------------------------------------------- errors through the CLI

def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cnnlab: error:"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("text, key", [
    ("[train]\nepochz = 3\n", "epochz"),
    ('[train]\nepochs = "ten"\n', "epochs"),
    ("[augment]\nzoom = -0.5\n", "zoom"),
])
def test_cli_config_error_is_one_line_exit_2(tmp_path, text, key):
    p = write(tmp_path, text, name="BAD.toml")
    proc = cli(["run", p, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    _assert_one_line_error(proc, key, str(p))
    assert not (tmp_path / "runs").exists()


def test_cli_bad_set_override(tmp_path):
    p = write(tmp_path, GOOD)
    proc = cli(["run", p, "--set", "train.batch_size=0", "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    _assert_one_line_error(proc, "batch_size", str(p))


def test_cli_batch_larger_than_training_split(tmp_path):
    p = write(tmp_path, """
        name = "toobig"
        [data]
        source = "synthetic"
        classes = 10
        synthetic_train = 100
        synthetic_test = 20
        [train]
        batch_size = 128
        epochs = 1
        precision = "fp32"
        """, name="toobig.toml")
    proc = cli(["run", p, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    _assert_one_line_error(proc, "batch_size", str(p), "training split", "90 images")
    # the check happens before a run folder is made
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_console_script_reports_config_error(tmp_path):
    """The installed `cnnlab` entry point behaves like `python -m cnnlab`."""
    import subprocess
    import sys

    from conftest import subprocess_env
    script = Path(sys.executable).parent / "cnnlab"
    if not script.is_file():
        pytest.skip("no cnnlab console script next to this interpreter")
    p = write(tmp_path, "[early_stopping]\nenabled = true\nmonitor = \"val_acc\"\n", name="BAD.toml")
    (tmp_path / "home").mkdir()
    proc = subprocess.run([str(script), "run", str(p)], capture_output=True, text=True, cwd=tmp_path / "home",
                          env=subprocess_env(tmp_path / "home"), timeout=120)
    _assert_one_line_error(proc, "monitor", "val_acc", str(p))


def test_readme_config_reference_lists_every_key():
    """The README's reference block is valid TOML naming every key of every table (and nothing else)."""
    import dataclasses
    import tomllib

    from cnnlab.config import SECTIONS
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Config reference", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    ref = tomllib.loads(block)
    top = {f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS}
    assert {k for k, v in ref.items() if not isinstance(v, dict)} == top | {"base"}
    for name, tp in SECTIONS.items():
        assert set(ref[name]) == {f.name for f in dataclasses.fields(tp)}, name


def test_every_packaged_config_loads_and_its_cifar_nets_build():
    """The packaged configs are what users run first: each parses and checks, and each CIFAR net builds for
    the practice's 25 classes at 32x32 (the CUB ones need downloaded weights: test_transfer covers them)."""
    import torch

    from cnnlab.configs import all_configs, config_file
    from cnnlab.models.build import build_model
    names = all_configs()
    assert {"best", "practice/01_sgd20", "practice/11_es", "practice-birds/01_frozen"} <= set(names)
    for name in names:
        cfg = load_config(config_file(name))
        if not cfg.data.source.startswith("cifar"):
            continue
        model, _, size = build_model(cfg.model, cfg.data.classes, 32)
        assert size == 32 and cfg.augment.test_shift < size, name
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 25), name


def test_best_runs_end_to_end_with_its_own_recipe(tmp_path):
    """`best` as packaged (airnet, whitening from the data, 6 test-time views) on a small synthetic set."""
    import json

    import cnnlab
    run = cnnlab.run("best", data="synthetic", runs_dir=tmp_path / "runs", progress="none",
                     train={"epochs": 2, "warmup_epochs": 1, "precision": "fp32"},
                     **{"data.synthetic_train": 512, "data.synthetic_test": 128})
    res = json.loads((run.path / "results.json").read_text())
    assert res["status"] == "ok" and res["model"] == "airnet" and res["epochs_run"] == 2
    assert res["test_accuracy"] > 0.3          # 10 classes: chance is 0.1
    cfg = load_config(run.path / "config.toml")
    assert cfg.augment.test_flip and cfg.augment.test_shift == 1 and cfg.model.args == {"widths": [32, 96, 160]}


def test_a_file_named_like_its_packaged_base_is_not_its_own_base(tmp_path):
    """`best.toml` with base = "best" (a tuned copy of the recipe, named after it) means the packaged recipe,
    not a cycle of one file; a real cycle of two files is still one clear error."""
    mine = tmp_path / "best.toml"
    mine.write_text('base = "best"\nname = "my_best"\n[train]\nepochs = 3\n')
    cfg = load_config(mine)
    from cnnlab.configs import config_file
    packaged = load_config(config_file("best"))
    assert (cfg.name, cfg.train.epochs) == ("my_best", 3)
    assert cfg.train.lr == packaged.train.lr and cfg.model.name == packaged.model.name
    (tmp_path / "a.toml").write_text('base = "b"\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    with pytest.raises(ConfigError, match="makes a cycle of configs"):
        load_config(tmp_path / "a.toml")
