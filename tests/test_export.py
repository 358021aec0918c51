"""Export to ONNX and TorchScript: the file reproduces PyTorch at two batch sizes, labels.json, tolerance check."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.inference.export import (EXPORT_TOLERANCE, ExportMismatch, InferenceModule, check_tolerance, export_model,
                           onnxruntime_snippet)
from cnnlab.inference.predict import Predictor
from cnnlab.data.preprocess import Preprocess

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLASSES = ["ant", "bee", "cat", "dog"]
PRE = Preprocess(image_size=16, input_size=16, mean=[0.5, 0.45, 0.4], std=[0.25, 0.2, 0.3])


def bn_model() -> nn.Module:
    """A small ResNet-like CNN with BatchNorm whose running statistics are far from the defaults.

    Left in train mode on purpose: export must use an eval copy (running statistics), not batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(CLASSES)))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 3 + 1)
    return model.train()


def sample(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What cnnlab's own evaluation computes: Preprocess, eval-mode model, softmax."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return torch.softmax(m(PRE(x)), dim=1)


def test_inference_module_equals_preprocess_model_softmax():
    model = bn_model().eval()
    x = sample()
    with torch.no_grad():
        got = InferenceModule(model, PRE).eval()(x)
    torch.testing.assert_close(got, reference(model, x), rtol=0, atol=1e-7)
    plain = Preprocess(image_size=16, input_size=16)                       # no mean/std: x / 255 only
    with torch.no_grad():
        torch.testing.assert_close(InferenceModule(model, plain)(x), torch.softmax(model(x.float() / 255), 1))


def test_onnx_round_trip_two_batch_sizes(tmp_path):
    model = bn_model()
    path, diff = export_model(model, PRE, CLASSES, "onnx", tmp_path / "out" / "model.onnx", sample(8))
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert 0 <= diff < EXPORT_TOLERANCE
    check_tolerance(diff)
    assert model.training                                                  # the caller's model is untouched
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == CLASSES
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.json", "model.onnx"]

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("images", "tensor(uint8)", "probabilities")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 16, 16]  # symbolic batch axis
    for n in (5, 1):                                                       # sizes never seen at export
        x = sample(n, seed=n)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        torch.testing.assert_close(got, reference(model, x), rtol=0, atol=EXPORT_TOLERANCE)
    # eval-mode BatchNorm: an image's probabilities do not depend on the rest of its batch
    x = sample(5, seed=5)
    alone = session.run(None, {"images": x[:1].numpy()})[0]
    np.testing.assert_allclose(alone[0], session.run(None, {"images": x.numpy()})[0][0], atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_round_trip_two_batch_sizes(tmp_path):
    model = bn_model()
    path, diff = export_model(model, PRE, CLASSES, "torchscript", tmp_path / "model.pt", sample(8))
    assert 0 <= diff < EXPORT_TOLERANCE
    assert json.loads((tmp_path / "labels.json").read_text()) == CLASSES
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for n in (3, 1):
            x = sample(n, seed=10 + n)
            torch.testing.assert_close(loaded(x), reference(model, x), rtol=0, atol=EXPORT_TOLERANCE)


def test_onnx_fallback_to_torch_export_exporter(tmp_path, monkeypatch):
    """If the legacy exporter fails, the torch.export-based one writes an equivalent file."""
    pytest.importorskip("onnxscript")
    real = torch.onnx.export
    calls = []

    def legacy_breaks(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        if not dynamo:
            raise RuntimeError("no symbolic for aten::something")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_breaks)
    model = bn_model()
    path, diff = export_model(model, PRE, CLASSES, "onnx", tmp_path / "m.onnx", sample(4))
    assert calls == [False, True] and diff < EXPORT_TOLERANCE
    assert not list(tmp_path.glob("*.data"))                               # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = sample(3, seed=3)
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], reference(model, x).numpy(),
                               atol=EXPORT_TOLERANCE)


class FixedBatch(nn.Module):
    """Right in PyTorch at any batch size, but int(x.shape[0]) is frozen into a traced graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, len(CLASSES))

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_frozen_batch_size_is_caught(tmp_path, fmt):
    with pytest.raises(CnnlabError, match="exported .* fails at batch size 1"):
        export_model(FixedBatch(), PRE, CLASSES, fmt, tmp_path / f"m.{fmt}", sample(4))
    assert not list(tmp_path.iterdir())                                   # nothing half-written left behind


def test_model_that_fails_in_pytorch_is_reported(tmp_path):
    class Broken(FixedBatch):
        def forward(self, x):
            return self.fc(x.reshape(4, -1))
    with pytest.raises(CnnlabError, match="fails in PyTorch on a batch of 1"):
        export_model(Broken(), PRE, CLASSES, "torchscript", tmp_path / "m.pt", sample(4))


def test_tolerance_check_fails_on_perturbed_comparison(tmp_path):
    model = bn_model()
    path, diff = export_model(model, PRE, CLASSES, "onnx", tmp_path / "m.onnx", sample(8))
    check_tolerance(diff)
    x = sample(8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    got[3, 1] += 5e-4                                                      # a deliberately wrong file
    perturbed = float((got - reference(model, x)).abs().max())
    assert perturbed > EXPORT_TOLERANCE
    with pytest.raises(ExportMismatch, match="differ") as e:
        check_tolerance(perturbed)
    assert isinstance(e.value, CnnlabError)
    with pytest.raises(ExportMismatch):
        check_tolerance(math.nan)
    check_tolerance(perturbed, tolerance=1e-3)


def test_user_errors(tmp_path, monkeypatch):
    model = bn_model()
    with pytest.raises(CnnlabError, match="onnx, torchscript"):
        export_model(model, PRE, CLASSES, "tflite", tmp_path / "m.tflite", sample())
    with pytest.raises(CnnlabError, match="uint8"):
        export_model(model, PRE, CLASSES, "torchscript", tmp_path / "m.pt", sample().float())
    with pytest.raises(CnnlabError, match="16, 16"):
        export_model(model, PRE, CLASSES, "torchscript", tmp_path / "m.pt", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(CnnlabError, match="3 class names"):
        export_model(model, PRE, CLASSES[:3], "torchscript", tmp_path / "m.pt", sample())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)                  # the optional extra is not installed
    with pytest.raises(CnnlabError, match=r"pip install 'cnnlab\[onnx\]'"):
        export_model(model, PRE, CLASSES, "onnx", tmp_path / "m.onnx", sample())
    assert not list(tmp_path.iterdir())


def test_onnxruntime_snippet_runs_and_agrees_with_predictor(tmp_path, monkeypatch):
    model = bn_model()
    path, _ = export_model(model, PRE, CLASSES, "onnx", tmp_path / "export" / "model.onnx", sample(8))
    code = onnxruntime_snippet(path, 16)
    body = [line for line in code.splitlines() if line and not line.startswith(("import", "from"))]
    assert len(body) == 5
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save("image.jpg", quality=95)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(code, {})
        expect = Predictor(model, PRE, CLASSES).predict("image.jpg", topk=1)[0][0][0]
        assert buf.getvalue().strip() == expect
    crop = onnxruntime_snippet("m.onnx", 224, image_size=256, eval_crop=0.875)
    assert "(256, 256)" in crop and ".crop((16, 16, 240, 240))" in crop and ".resize(" not in crop


def _exported_matches_at_another_batch_size(model: nn.Module, fmt: str, tmp_path) -> torch.Tensor:
    """Export `model` (traced on 8 images), then check the file on 3 others against cnnlab's own scoring."""
    path, diff = export_model(model, PRE, CLASSES, fmt, tmp_path / f"model.{fmt}", sample(8))
    assert 0 <= diff < EXPORT_TOLERANCE
    x = sample(3, seed=3)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    else:
        got = torch.jit.load(str(path))(x)
    torch.testing.assert_close(got, reference(model, x), rtol=0, atol=EXPORT_TOLERANCE)
    return x


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_test_time_views_travel_into_the_exported_file(tmp_path, fmt):
    from cnnlab.models.build import TestTimeAverage
    model = TestTimeAverage(bn_model(), flip=True, shift=1).eval()
    x = _exported_matches_at_another_batch_size(model, fmt, tmp_path)
    assert not torch.allclose(reference(model, x), reference(model.net, x), atol=1e-4)   # the views count


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_ensemble_in_one_network_exports_at_any_batch_size(tmp_path, fmt):
    """airnet with members = 2 predicts its members' mean probability; the file does the same at batch
    sizes other than the traced one (its heads split the features by member, never by batch size)."""
    from cnnlab.models import create_model
    torch.manual_seed(0)
    model = create_model("airnet", len(CLASSES), widths=[4, 6], members=2).eval()
    _exported_matches_at_another_batch_size(model, fmt, tmp_path)
