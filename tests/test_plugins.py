"""Your own net from outside cnnlab: a module:function classifier trains as a registered net does, installed
plugins (entry point group cnnlab.models) and [model] module reach the CLI and `predict`, and offline runs fail
fast with cnnlab's message, or say where the run's code was. Tiny nets, synthetic data, temporary modules."""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import cnnlab.models as registry
from cnnlab.config import ModelConfig
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.models import plugins
from cnnlab.models.build import build_model
from cnnlab.models.parts import is_backbone_model
from cnnlab.records.io import read_json

from conftest import cli, run_cli

NETS = '''
from torch import nn
from cnnlab.models import register_model


def convbn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A conv-BN classifier with its own last layer."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


def four_way() -> nn.Module:
    """A classifier for exactly 4 classes, no num_classes argument."""
    return convbn(4)


@register_model
def {prefix}_reg(num_classes: int = 10, width: int = 8) -> nn.Module:
    """The same net, registered from Python."""
    return convbn(num_classes, width)
'''

SYN = """
name = "{name}"
[data]
source = "synthetic"
classes = 4
synthetic_train = 96
synthetic_test = 24
[train]
optimizer = "adam"
epochs = 1
batch_size = 32
precision = "fp32"
"""


@pytest.fixture
def code(tmp_path, monkeypatch):
    """A folder on sys.path for the test's own modules; registry, plugins and sys.modules restored afterwards."""
    folder = tmp_path / "code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))        # also restores sys.path (a --code-dir adds to it) at the end
    models, descriptions = dict(registry._MODELS), dict(registry._DESCRIPTIONS)
    registry._load_builtin()
    monkeypatch.setattr(plugins, "FAILED", {})
    monkeypatch.setattr(plugins, "ORIGIN", {})
    yield folder
    for name, m in list(sys.modules.items()):        # only the test's modules: torch's own stay imported
        if str(getattr(m, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]
    registry._MODELS.clear(), registry._MODELS.update(models)
    registry._DESCRIPTIONS.clear(), registry._DESCRIPTIONS.update(descriptions)
    importlib.invalidate_caches()


def write_nets(folder: Path, name: str) -> str:
    """Module `name` (a dotted name makes packages) with convbn, four_way and `<last part>_reg`; returns name."""
    *pkgs, leaf = name.split(".")
    where = folder
    for p in pkgs:
        where = where / p
        where.mkdir(exist_ok=True)
        (where / "__init__.py").write_text("")
    (where / f"{leaf}.py").write_text(NETS.replace("{prefix}", leaf))
    importlib.invalidate_caches()
    return name


def forget(folder: Path, name: str) -> None:
    """As a process without the code's folder on its path: neither importable nor registered."""
    sys.path.remove(str(folder))
    for m in [m for m in sys.modules if m == name.split(".")[0] or m.startswith(name.split(".")[0] + ".")]:
        del sys.modules[m]
    for n in [n for n in registry._MODELS if n.endswith("_reg")]:
        del registry._MODELS[n]
    importlib.invalidate_caches()


def train(tmp_path: Path, name: str, *sets: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(SYN.format(name=name))
    out = cli(["run", cfg, "--runs-dir", tmp_path / "runs", *[a for s in sets for a in ("--set", s)]], tmp_path)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").glob(f"{name}-*")
    return run


def images(tmp_path: Path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


# 1. a module:function classifier ---------------------------------------------------------------------------------

def test_a_function_taking_num_classes_is_built_as_its_registered_twin(code):
    mod = write_nets(code, "nets_a")
    fn_model, fn_norm, fn_size = build_model(ModelConfig(name=f"{mod}:convbn"), 4, 32)
    reg_model, reg_norm, reg_size = build_model(ModelConfig(name="nets_a_reg", module=mod), 4, 32)
    assert not is_backbone_model(fn_model)                       # no head stacked on its logits
    assert (fn_size, fn_norm) == (reg_size, reg_norm) == (32, None)  # images at their size, the run's normalization
    assert sum(p.numel() for p in fn_model.parameters()) == sum(p.numel() for p in reg_model.parameters()) == 860
    assert fn_model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_cli_module_function_run_is_preprocessed_as_the_registered_run(code, tmp_path):
    mod = write_nets(code, "nets_b")
    fn_run = train(tmp_path, "fn", f"model.name={mod}:convbn")
    reg_run = train(tmp_path, "reg", "model.name=nets_b_reg", f"model.module={mod}")
    assert read_json(fn_run / "preprocess.json") == read_json(reg_run / "preprocess.json")
    assert read_json(fn_run / "preprocess.json")["input_size"] == 32
    assert read_json(fn_run / "meta.json")["params"] == read_json(reg_run / "meta.json")["params"] == 860
    summary = (fn_run / "summary.txt").read_text()
    assert "head" not in summary and "8 (Linear)" in summary


def test_kind_says_what_the_function_is(code):
    mod = write_nets(code, "nets_c")
    as_backbone, _, size = build_model(ModelConfig(name=f"{mod}:convbn", kind="backbone", weights="none",
                                                   input_size=32, mean=[0.5] * 3, std=[0.5] * 3), 4, 32)
    assert is_backbone_model(as_backbone) and size == 32
    fixed, _, _ = build_model(ModelConfig(name=f"{mod}:four_way", kind="classifier"), 4, 32)
    assert not is_backbone_model(fixed)
    with pytest.raises(ConfigError, match=r"gives \(2, 4\).*not \(2, 10\) logits.*kind = 'backbone'"):
        build_model(ModelConfig(name=f"{mod}:four_way", kind="classifier"), 10, 32)
    with pytest.raises(ConfigError, match=r"\[model\] head is for backbones.*whole classifier \(it takes num_classes\)"):
        build_model(ModelConfig(name=f"{mod}:convbn", head=[16]), 4, 32)
    with pytest.raises(ConfigError, match="kind = 'classifier' is for package.module:function"):
        build_model(ModelConfig(name="test_resnet", kind="classifier"), 4, 32)


# 2. plugins and [model] module ------------------------------------------------------------------------------------

def install_plugin(site: Path, entry_points: str, modules: dict[str, str]) -> None:
    """A distribution 'mynetsplug' 0.3 as pip would leave it: a dist-info with entry points, and its modules."""
    info = site / "mynetsplug-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mynetsplug\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[cnnlab.models]\n{entry_points}")
    for name, text in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(text))
    importlib.invalidate_caches()


PLUGIN = '''
from torch import nn

def plugnet(num_classes: int = 10) -> nn.Module:
    """A plugin's own classifier."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


def test_an_installed_plugin_is_listed_trained_and_predicted_without_trust_code(code, tmp_path, monkeypatch):
    install_plugin(code, "plugnet = plugmod:plugnet\nbroken = plugbad\n",
                   {"plugmod": PLUGIN, "plugbad": "raise ImportError('needs libfoo')\n"})
    monkeypatch.setattr(plugins, "_loaded", False)
    listed = cli(["models"], tmp_path)
    line = next(l for l in listed.stdout.splitlines() if l.startswith("plugnet"))
    assert "A plugin's own classifier." in line and "[plugin mynetsplug]" in line
    assert "broken = 'plugbad' (distribution mynetsplug) did not load: ImportError: needs libfoo" in listed.stderr
    with pytest.raises(ConfigError, match=r"did not load: broken = plugbad \(mynetsplug: ImportError: needs libfoo\)"):
        registry.create_model("broken", 4)

    run = train(tmp_path, "plug", "model.name=plugnet")
    assert read_json(run / "meta.json")["model_code"]["plugin"] == {
        "distribution": "mynetsplug", "version": "0.3", "entry_point": "plugnet = plugmod:plugnet"}
    out = cli(["predict", run, images(tmp_path)], tmp_path)
    assert out.returncode == 0 and "0.png" in out.stdout, out.stderr

    forget(code, "plugmod")                                      # uninstalled
    del registry._MODELS["plugnet"]
    out = cli(["predict", run, images(tmp_path)], tmp_path)
    assert out.returncode == 2
    assert ("came from the plugin mynetsplug 0.3 (entry point plugnet = plugmod:plugnet in group cnnlab.models), "
            "which is not installed here: pip install mynetsplug") in out.stderr


def test_model_module_reaches_the_cli_and_predict_in_a_fresh_registry(code, tmp_path):
    mod = write_nets(code, "nets_d")
    run = train(tmp_path, "mod", "model.name=nets_d_reg", f"model.module={mod}")
    forget(code, mod)                                            # a later process: nothing imported
    out = cli(["predict", run, images(tmp_path), "--trust-code"], tmp_path)
    assert out.returncode == 2 and f"--code-dir {code.resolve()}" in out.stderr
    out = cli(["predict", run, images(tmp_path), "--trust-code", "--code-dir", code], tmp_path)
    assert out.returncode == 0 and "1.png" in out.stdout, out.stderr
    untrusted = cli(["predict", run, images(tmp_path)], tmp_path)
    assert untrusted.returncode == 2 and "[model] module = 'nets_d' is code" in untrusted.stderr


def test_a_net_registered_from_python_is_recorded_for_later_processes(code, tmp_path):
    from cnnlab.config import from_dict
    from cnnlab.experiments.run import run_experiment
    from cnnlab.inference.model import load_model
    mod = write_nets(code, "nets_e")
    importlib.import_module(mod)                                 # registers nets_e_reg, as a notebook's import would
    cfg = from_dict({"name": "py", "data": {"source": "synthetic", "classes": 4, "synthetic_train": 96,
                                            "synthetic_test": 24},
                     "model": {"name": "nets_e_reg"}, "train": {"epochs": 1, "batch_size": 32, "precision": "fp32"}})
    run = run_experiment(cfg, tmp_path / "runs", progress="none").path
    assert "module = \"nets_e\"" in (run / "config.toml").read_text()
    del registry._MODELS["nets_e_reg"], sys.modules[mod]
    model, _, classes, _ = load_model(run, trust_code=True)
    assert len(classes) == 4 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_readme_no_longer_promises_a_models_folder():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "put it in `src/cnnlab/models/`" not in readme
    assert '[project.entry-points."cnnlab.models"]' in readme and "--code-dir" in readme


# 5. offline -------------------------------------------------------------------------------------------------------

def test_a_timm_name_fails_at_once_when_the_hub_does_not_answer(tmp_path):
    cfg = tmp_path / "hub.toml"
    cfg.write_text(SYN.format(name="hub") + '[model]\nname = "resnet18"\n')
    out = run_cli(["run", cfg, "--runs-dir", tmp_path / "runs"], tmp_path, timeout=120,
                  HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("cnnlab: error: [model] weights: cannot get pretrained weights for 'resnet18'")
    assert "127.0.0.1:9 did not answer within 1.5 s, so nothing was downloaded or retried" in err
    assert "set [model] weights = '/path/to/file.safetensors'" in err


def test_a_torchvision_download_is_not_attempted_when_nothing_answers(tmp_path, monkeypatch):
    from cnnlab.models import hub
    from cnnlab.models.backbones import create_backbone
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # an empty cache
    asked = []
    monkeypatch.setattr(hub, "reachable", lambda url: asked.append(url) or False)
    with pytest.raises(CnnlabError, match=r"tv:resnet18.*not in the local cache.*did not answer"):
        create_backbone("tv:resnet18", "")
    assert asked and asked[0].startswith("https://download.pytorch.org/")


def test_a_run_of_a_package_function_says_which_folder_makes_it_importable(code, tmp_path):
    mod = write_nets(code, "labnets.small")
    run = train(tmp_path, "pkg", f"model.name={mod}:convbn")
    recorded = read_json(run / "meta.json")["model_code"]["modules"]
    assert recorded == [{"module": "labnets.small", "file": str((code / "labnets" / "small.py").resolve())}]
    forget(code, mod)
    out = cli(["evaluate", run, "--trust-code"], tmp_path)
    assert out.returncode == 2
    assert (f"module 'labnets.small' is not importable here (not on the Python path); it was "
            f"{(code / 'labnets' / 'small.py').resolve()} when the run trained: add {code.resolve()} to PYTHONPATH "
            f"or pass --code-dir {code.resolve()}") in out.stderr
    out = cli(["evaluate", run, "--trust-code", "--code-dir", code], tmp_path)
    assert out.returncode == 0, out.stderr
