"""A run folder someone sent you: rebuilding its model never runs code you did not ask to trust."""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
import torch
import tomli_w

import cnnlab
from cnnlab.config import from_dict, load_config, read_toml
from cnnlab.errors import ConfigError
from cnnlab.experiments.run import run_experiment
from cnnlab.inference.model import Model, load_model
from cnnlab.models.backbones import create_backbone
from cnnlab.models.trust import UntrustedCode, check_trusted

from conftest import cli

SYN = {"source": "synthetic", "classes": 4, "synthetic_train": 160, "synthetic_test": 40}
TRAIN = {"optimizer": "adam", "epochs": 1, "batch_size": 32, "precision": "fp32"}


def broken_backbone():
    """A user function that fails: its error must come out as one line, not a traceback."""
    raise RuntimeError("no weights here")


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory) -> Path:
    """A real run of a custom `module:function` backbone (tests/test_transfer.py's tiny_backbone)."""
    cfg = from_dict({"name": "custom", "data": SYN, "train": TRAIN,
                     "model": {"name": "test_transfer:tiny_backbone", "weights": "none", "input_size": 32,
                               "args": {"width": 6}}})
    return run_experiment(cfg, tmp_path_factory.mktemp("trust") / "runs", progress="none").path


def planted(run: Path, where: Path, marker: Path) -> Path:
    """A copy of `run` whose config.toml names os:system with a command that would create `marker`."""
    copy = where / "received"
    shutil.copytree(run, copy)
    raw = read_toml(copy / "config.toml")
    raw["model"]["name"] = "os:system"
    raw["model"]["args"] = {"command": f"touch {marker}"}
    (copy / "config.toml").write_bytes(tomli_w.dumps(raw).encode())
    (copy / "results.json").unlink()              # so `run --resume` gets as far as rebuilding the model
    return copy


COMMANDS = {                  # each command that rebuilds a model from a folder: {run} = the folder
    "evaluate": ["evaluate", "{run}"],
    "predict": ["predict", "{run}", "{img}"],
    "export": ["export", "{run}", "--format", "torchscript"],
    "rerun": ["rerun", "{run}", "--runs-dir", "{runs}"],
    "resume": ["run", "--resume", "{run}", "--runs-dir", "{runs}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_planted_os_system_does_not_run_without_trust_code(custom_run, tmp_path, command):
    marker = tmp_path / "PWNED"
    folder = planted(custom_run, tmp_path, marker)
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    args = [a.format(run=folder, img=img, runs=tmp_path / "runs") for a in COMMANDS[command]]
    proc = cli(args, tmp_path / "home")
    assert proc.returncode == 2
    assert not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "os:system" in lines[0] and "system()" in lines[0] and "--trust-code" in lines[0]
    assert not (tmp_path / "runs").exists()                      # rerun made no folder either
    assert not (folder / "export").exists() and not (folder / "eval-test").exists()


def test_the_python_api_refuses_it_too_and_imports_nothing(custom_run, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    folder = planted(custom_run, tmp_path, marker)
    imported = []
    import importlib
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    for load in (lambda: cnnlab.load(folder), lambda: Model(folder), lambda: load_model(folder)):
        with pytest.raises(UntrustedCode, match=r"os:system.*trust_code=True"):
            load()
    assert not marker.exists() and "os" not in imported


def test_with_trust_code_a_custom_backbone_run_loads_and_scores_as_it_did(custom_run):
    with pytest.raises(UntrustedCode, match="test_transfer:tiny_backbone"):
        load_model(custom_run)
    run = load_model(custom_run, trust_code=True)
    assert run.model.backbone[0].out_channels == 6                 # [model.args] width = 6 went in
    model = cnnlab.load(custom_run, trust_code=True)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    probs = model.probabilities(x)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(1), torch.ones(3))


def test_cli_with_trust_code_evaluates_a_custom_backbone_run(custom_run, tmp_path):
    folder = tmp_path / "received"
    shutil.copytree(custom_run, folder)
    proc = cli(["evaluate", folder, "--trust-code"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and (folder / "eval-test" / "evaluation.json").is_file()


def test_library_models_need_no_flag():
    for name in ("basenet", "resnet18", "tv:resnet18"):
        check_trusted(from_dict({"model": {"name": name}}).model, False, "x/config.toml")     # no error


@pytest.mark.parametrize("name", ["os:system; rm -rf x", "os:system()", "../evil:fn", "a.b:c.d", "mod:", ":fn",
                                  "pkg-name:fn", "os:sys tem"])
def test_the_recorded_entry_must_be_module_colon_function(name):
    cfg = from_dict({"model": {"name": name}}).model
    with pytest.raises(ConfigError, match="package.module:function"):
        check_trusted(cfg, True, "x/config.toml")            # checked before import, trusted or not
    with pytest.raises(ConfigError, match="package.module:function"):
        create_backbone(name)                                # and in the user's own configs


def test_model_args_must_be_literals(tmp_path):
    (tmp_path / "config.toml").write_bytes(tomli_w.dumps(
        {"model": {"name": "basenet", "args": {"when": datetime.datetime(2026, 1, 1)}}}).encode())
    cfg = load_config(tmp_path / "config.toml")
    with pytest.raises(ConfigError, match=r"\[model.args\] may hold only numbers, strings"):
        check_trusted(cfg.model, True, str(tmp_path / "config.toml"))
    ok = from_dict({"model": {"name": "basenet", "args": {"a": [1, 2.5, "x", True], "t": {"k": [0]}}}}).model
    check_trusted(ok, False, "x")


def test_a_user_function_that_raises_is_one_line(tmp_path):
    """`cnnlab run` of your own config calls your function; its exception is one line naming it, exit 2."""
    for name, args, expect in (("test_trust:broken_backbone", {}, "broken_backbone() raised RuntimeError: no weights here"),
                               ("os:system", {}, "system() raised TypeError")):
        cfg = tmp_path / f"{name.split(':')[1]}.toml"
        cfg.write_bytes(tomli_w.dumps({"name": "own", "data": SYN, "train": TRAIN,
                                       "model": {"name": name, "weights": "none", "args": args}}).encode())
        proc = cli(["run", cfg, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0] and name in lines[0], proc.stderr
