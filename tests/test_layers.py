"""[model] layers: Keras layer calls as strings. The practice's nets written this way match the registered ones
(Keras parameter counts, initial weights under one seed), Keras's shapes, one clear error per bad layer, and a
layer-list run is a whole run: summary, resume, evaluate, predict, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnlab.api import load_model
from cnnlab.config import ModelConfig, from_dict, load_config
from cnnlab.configs import config_file
from cnnlab.data import load_dataset
from cnnlab.errors import ConfigError, RunInterrupted
from cnnlab.experiments.run import run_experiment
from cnnlab.models import create_model, summary
from cnnlab.models.build import build_model
from cnnlab.models.cifar import keras_param_count
from cnnlab.models.layers import build_layers
from cnnlab.training.callbacks import Callback

from conftest import cli, synthetic_row

# The practice's 2.3 deeper net, as the seed's Keras code writes it (fused ReLUs, softmax classifier) ...
DEEP = ["Conv2D(6, kernel_size=5, activation='relu', input_shape=(32, 32, 3))",
        "Conv2D(16, kernel_size=3, activation='relu', padding='same')", "MaxPooling2D(pool_size=2)",
        "Conv2D(16, kernel_size=3, activation='relu', padding='same')",
        "Conv2D(24, kernel_size=3, activation='relu', padding='same')",
        "Conv2D(32, kernel_size=5, activation='relu')", "MaxPooling2D(pool_size=2)", "Flatten()",
        "Dense(100, activation='relu')", "Dense(50, activation='relu')", "Dense(25, activation='softmax')"]
# ... and 2.4.1 (BatchNorm before each ReLU), written as separate layers and without the classifier.
BN_PRE = ["Conv2D(6, 5)", "BatchNormalization()", "ReLU()", "Conv2D(16, 3, padding='same')", "BatchNormalization()",
          "ReLU()", "MaxPooling2D(2)", "Conv2D(16, 3, padding='same')", "BatchNormalization()", "ReLU()",
          "Conv2D(24, 3, padding='same')", "BatchNormalization()", "ReLU()", "Conv2D(32, 5)", "BatchNormalization()",
          "ReLU()", "MaxPooling2D(2)", "Flatten()", "Dense(100)", "BatchNormalization()", "ReLU()", "Dense(50)",
          "BatchNormalization()", "ReLU()"]


def _packaged_deep() -> list[str]:
    return load_config(config_file("deepnet_layers")).model.layers


@pytest.mark.parametrize("layers, registered, params", [
    (DEEP, "deepnet", 112_793), (_packaged_deep(), "deepnet", 112_793), (BN_PRE, "deepnet_bn_pre", 113_769)])
def test_practice_nets_as_layers_have_its_parameter_counts_and_the_registered_initial_weights(layers, registered, params):
    torch.manual_seed(7)
    net, _, size = build_model(ModelConfig(name="mine", layers=layers), 25, 32)
    torch.manual_seed(7)
    ref = create_model(registered, 25, 32)
    assert size == 32 and keras_param_count(net) == keras_param_count(ref) == params
    mine, theirs = list(net.state_dict().values()), list(ref.state_dict().values())
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):            # every weight, bias and BatchNorm statistic, bit for bit
        assert a.shape == b.shape and torch.equal(a, b)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():                      # the registered net pools before its ReLU: the same numbers
        assert torch.equal(net.eval()(x), ref.eval()(x))
    torch.manual_seed(8)                       # another seed, other weights: the comparison can fail
    assert not torch.equal(build_layers(layers, 25, 32)[0].weight, net[0].weight)


def test_summary_rows_are_the_users_layers():
    table = summary(build_layers(DEEP, 25, 32), (3, 32, 32))
    rows = [line for line in table.splitlines() if line[:1].isdigit()]
    assert len(rows) == len(DEEP)             # fused activations stay one row each, as in Keras
    assert rows[0].startswith("0 (Conv2D(6, kernel_size=5, activation='relu', input_shape=(32, 32, 3)))")
    assert "(6, 28, 28)" in rows[0] and rows[0].rstrip().endswith("456")
    assert "(32, 5, 5)" in rows[6] and "(800,)" in rows[7]
    assert "Total params: 112,793" in table


def test_keras_same_padding_puts_the_odd_pixel_after_and_pools_ignore_it():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    conv = build_layers(["Conv2D(4, 3, strides=2, padding='same')", "Flatten()"], 5, 6)[0]
    # TensorFlow: output ceil(6/2) = 3; total padding (3-1)*2+3-6 = 1, all of it at the bottom/right
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2), atol=1e-6)
    assert build_layers(["Conv2D(4, 4, padding='same')", "Flatten()"], 5, 6)[0](x).shape[-2:] == (6, 6)
    avg = build_layers(["AveragePooling2D(3, strides=2, padding='same')", "Flatten()"], 5, 6)[0]
    mx = build_layers(["MaxPooling2D(3, strides=2, padding='same')", "Flatten()"], 5, 6)[0]
    ones = torch.ones(1, 1, 6, 6)
    assert torch.equal(avg(ones), torch.ones(1, 1, 3, 3))          # the padding is not averaged in
    assert torch.equal(mx(-ones), -torch.ones(1, 1, 3, 3))         # nor does it win a max
    # valid pooling: Keras's strides default to the pool size
    assert build_layers(["MaxPooling2D(3)", "Flatten()"], 5, 7)[0](torch.ones(1, 1, 7, 7)).shape[-1] == 2


def test_the_classifier_is_appended_or_checked_against_the_classes():
    net = build_layers(["Conv2D(4, 3)", "GlobalAveragePooling2D()", "Dropout(0.2)"], 6, 16)
    assert isinstance(net[-1], torch.nn.Linear) and (net[-1].in_features, net[-1].out_features) == (4, 6)
    with pytest.raises(ConfigError, match=r"layers\[2\] = 'Dense\(7\)'.*7 units but the data has 6 classes.*Dense\(6\)"):
        build_layers(["Conv2D(4, 3)", "Flatten()", "Dense(7)"], 6, 16)
    hidden = build_layers(["Conv2D(4, 3)", "Flatten()", "Dense(9, activation='relu')", "Softmax()"], 6, 16)
    assert [type(m).__name__ for m in hidden] == ["Conv2D", "Flatten", "Dense", "Dense"]   # Softmax: the loss's
    assert (hidden[2].out_features, hidden[2].activation, hidden[3].out_features) == (9, "relu", 6)
    with pytest.raises(ConfigError, match=r"layers\[0\].*input_shape \(28, 28, 3\) is not the data's \(16, 16, 3\)"):
        build_layers(["Conv2D(4, 3, input_shape=(28, 28, 3))", "Flatten()"], 6, 16)
    with pytest.raises(ConfigError, match=r"layers\[2\].*6x6 images are too small.*image_size >= 8"):
        build_layers(["Conv2D(4, 3)", "MaxPooling2D(2)", "Conv2D(4, 3)", "Flatten()"], 6, 6)


def test_keras_input_starts_a_list_and_is_checked_against_the_data():
    torch.manual_seed(3)
    with_input = build_layers(["keras.Input(shape=(16, 16, 3))", *TINY], 4, 16)
    torch.manual_seed(3)
    plain = build_layers(TINY, 4, 16)
    assert len(with_input) == len(plain) and all(
        torch.equal(a, b) for a, b in zip(with_input.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ConfigError, match=r"layers\[0\].*shape \(32, 32, 3\) is not the data's \(16, 16, 3\)"):
        build_layers(["Input((32, 32, 3))", *TINY], 4, 16)
    with pytest.raises(ConfigError, match=r"layers\[1\] = 'Input\(\(16, 16, 3\)\)': Input belongs on the first layer"):
        build_layers(["Conv2D(4, 3)", "Input((16, 16, 3))", "Flatten()"], 4, 16)


def test_a_layer_too_large_to_build_is_refused_before_anything_is_allocated(tmp_path):
    with pytest.raises(ConfigError, match=r"layers\[2\].*12,845,312,000 parameters.*50,176 features.*GlobalAveragePooling2D"):
        build_layers(["Conv2D(64, 3, padding='same')", "Flatten()", "Dense(256000, activation='relu')"], 10, 28)
    with pytest.raises(ConfigError, match=r"layers\[0\].*280,000,000 parameters.*fewer filters"):
        build_layers(["Conv2D(10000000, 3)", "Flatten()"], 10, 28)
    # found only once the data is known (its classes): the line names the file too
    cfg = tmp_path / "big.toml"
    cfg.write_text("[data]\nsource = 'synthetic'\nclasses = 4\n[model]\nlayers = [\"Flatten()\", \"Dense(7)\"]\n")
    proc = cli(["run", cfg], tmp_path / "home")
    assert proc.returncode == 2 and proc.stderr.startswith(f"cnnlab: error: {cfg}: [model] layers[1] = 'Dense(7)'")
    assert "data has 4 classes" in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("bad, says", [
    ("Conv3D(8, 3)", ["'Conv3D' is not a layer cnnlab builds", "allowed: Conv2D, MaxPooling2D"]),
    ("Conv2D(8, 3, pading='same')", ["Conv2D has no argument 'pading'", "padding"]),
    ("Dense(__import__('os').system('touch HACKED'))", ["argument units", "must be a literal"]),
    ("Conv2D(8, 3, padding='full')", ["padding must be 'valid' or 'same'"]),
    ("Conv2D(8)", ["Conv2D needs kernel_size"]),
    ("Dropout(1.5)", ["rate must be a number in [0, 1)"]),
    ("Dense(10)", ["needs flat features", "Flatten()"]),
    ("Conv2D(8, 3, activation='softmax')", ["softmax belongs at the end"]),
    ("conv2d 8 3", ["must be one layer call"]),
])
def test_a_bad_layer_is_one_line_naming_its_index_text_and_what_is_allowed(tmp_path, bad, says):
    layers = ["Conv2D(4, 3)", bad, "Flatten()"]
    with pytest.raises(ConfigError) as e:
        from_dict({"model": {"name": "mine", "layers": layers}})
    assert f"[model] layers[1] = {bad!r}" in str(e.value)
    for s in says:
        assert s in str(e.value)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[data]\nsource = 'synthetic'\n[model]\nlayers = {json.dumps(layers)}\n")
    proc = cli(["run", cfg, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("cnnlab: error:") and "layers[1]" in line and says[0] in line
    assert not (tmp_path / "home" / "HACKED").exists()


def test_layers_with_a_registered_name_or_args_are_refused():
    with pytest.raises(ConfigError, match="name = 'deepnet' names the registered net"):
        from_dict({"model": {"name": "deepnet", "layers": DEEP}})
    with pytest.raises(ConfigError, match="'args' is for a registered model"):
        from_dict({"model": {"name": "mine", "layers": DEEP, "args": {"width": 2}}})


class _StopAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


SYN = {"source": "synthetic", "classes": 4, "synthetic_train": 160, "synthetic_test": 40}
TINY = ["Conv2D(8, 3, padding='same', activation='relu')", "MaxPooling2D(2)", "BatchNormalization()",
        "Conv2D(8, 3, strides=2, padding='same')", "ReLU()", "GlobalAveragePooling2D()", "Dropout(0.1)"]


def test_a_layer_list_run_resumes_and_is_evaluated_predicted_and_exported(tmp_path):
    raw = {"name": "tiny", "data": SYN, "model": {"layers": TINY},
           "train": {"optimizer": "adam", "epochs": 2, "batch_size": 32, "precision": "fp32"}}
    with pytest.raises(RunInterrupted) as e:
        run_experiment(from_dict(raw), tmp_path / "runs", progress="none", callbacks=[_StopAfter(1)])
    run = Path(str(e.value))
    # resumed from config.toml alone: the layer list round-trips through the run folder
    proc = cli(["run", "--resume", run, "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok" and results["epochs_run"] == 2 and results["model"] == "layers"
    table = (run / "summary.txt").read_text()
    assert "3 (Conv2D(8, 3, strides=2, padding='same'))" in table and "7 (Dense(4))" in table
    ds = load_dataset(from_dict({"data": SYN}).data)
    model, pre, classes, _ = load_model(run)
    with torch.no_grad():
        acc = (model(pre(ds.x_test)).argmax(1) == ds.y_test).float().mean().item()
    assert acc == pytest.approx(results["test_accuracy"], abs=1e-6) and classes == ds.classes
    ev = cli(["evaluate", run], tmp_path / "home")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((run / "eval-test" / "evaluation.json").read_text())["accuracy"] == pytest.approx(acc, abs=1e-9)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    pred = cli(["predict", run, image, "--topk", "2", "--out", tmp_path / "pred.json"], tmp_path / "home")
    assert pred.returncode == 0, pred.stderr
    assert len(json.loads((tmp_path / "pred.json").read_text())[0]["top"]) == 2
    out = tmp_path / "m.pt"
    exp = cli(["export", run, "--format", "torchscript", "--out", out], tmp_path / "home")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert float(exp.stdout.split("PyTorch on real inputs: ")[1].split()[0]) <= 1e-4


BASENET = ["Conv2D(6, 5, activation='relu')", "MaxPooling2D(2)", "Conv2D(16, 5, activation='relu')", "MaxPooling2D(2)",
           "Flatten()", "Dense(50, activation='relu')"]


def test_a_layer_list_row_in_a_suite_trains_as_the_registered_net_it_writes(tmp_path):
    """BaseNet written as layers, beside the registered basenet, via `cnnlab suite`: same seed, same initial
    weights, same numbers; the report shows it as a row of its own and rebuilds from the folder."""
    suite = tmp_path / "mine"
    suite.mkdir()
    (suite / "01_base.toml").write_text(synthetic_row("base", 0.003, 2, "registered"))
    as_layers = synthetic_row("mine", 0.003, 2, "as layers").replace(
        'name = "basenet"', f"name = \"basenet-layers\"\nlayers = {json.dumps(BASENET)}")
    (suite / "02_mine.toml").write_text(as_layers)
    runs = tmp_path / "runs"
    proc = cli(["suite", suite, "--runs-dir", runs, "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 runs ok" in proc.stdout
    folder = next(runs.iterdir())
    base, mine = (json.loads((folder / "rows" / d / "results.json").read_text()) for d in ("01-base", "02-mine"))
    assert (base["model"], mine["model"]) == ("basenet", "basenet-layers")
    for key in ("test_accuracy", "test_loss", "val_accuracy"):
        assert mine[key] == base[key], key
    assert "Total params: 23,432" in (folder / "rows" / "02-mine" / "summary.txt").read_text()   # 10 classes
    report = (folder / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| as layers |"))
    assert "| basenet-layers | adam | 2 |" in row and f"{mine['test_accuracy']:.4f}" in row
    (folder / "report.md").unlink()
    assert cli(["report", folder], tmp_path / "home").returncode == 0
    assert row in (folder / "report.md").read_text()
