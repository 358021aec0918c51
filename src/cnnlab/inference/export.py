"""Export a trained model, its input scaling included, to one ONNX or TorchScript file plus labels.json.

The exported graph is `InferenceModule`: uint8 RGB (N, 3, input_size, input_size) in, softmax
probabilities (N, K) out. The x/255 and mean/std of the run's `Preprocess` are inside the file, so a
consumer only has to decode, resize and centre-crop; labels.json beside it lists the class names in label
order. The input must already be input_size x input_size: the exported graph does no resizing or cropping.

After writing, the file is loaded back (onnxruntime, or torch.jit.load) and compared with the PyTorch
module on real images at two batch sizes (which also proves the batch axis is dynamic); `export_model`
returns the largest absolute difference of the probabilities, and `check_tolerance` turns a difference
above EXPORT_TOLERANCE into `ExportMismatch`.

Which ONNX exporter (measured with torch 2.14.1, onnxruntime 1.32, onnxscript 0.7 on 2 CPU cores):
the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) is used first. It exported a
BatchNorm CNN and timm resnet18, efficientnet_b0, mobilenetv3_small_100, convnext_atto and
vit_tiny_patch16 in 1-2 s each, at opset 17, with a dynamic batch axis, all matching PyTorch within 1e-7,
and it needs no package beyond torch. The torch.export-based exporter (`dynamo=True`, torch's default)
matched equally well on those models but took 3-30 s each, needs onnxscript, cannot write opset 17 (its
converter from 18 fails on these graphs and silently keeps 18), prints progress to stdout, and with
optimize=False wrote invalid files (a buffer named "mean" defined twice). torch deprecates the legacy
exporter (a DeprecationWarning, silenced here), but cnnlab pins torch, so it is present; should it fail on
a model (an operator it has no translation for) or disappear in a later torch, `export_model` falls back
to the torch.export-based exporter at opset 18. Either way the numerical check below is the arbiter.

TorchScript: `torch.jit.trace`, not `torch.jit.script`: scripting rejects many timm and user models
(untyped Python), while tracing records exactly the eval-mode operations; its one risk, a batch size
frozen into the graph, is caught by the check at a second batch size. torch 2.14 marks torch.jit as
deprecated (FutureWarning, silenced here); the file loads in C++ (libtorch) and Python without cnnlab.

Using the ONNX file from plain onnxruntime (`onnxruntime_snippet` writes this for a given file and size):

    import json, numpy as np, onnxruntime as ort
    from PIL import Image, ImageOps
    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    image = ImageOps.fit(Image.open("image.jpg").convert("RGB"), (224, 224), Image.BILINEAR)
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]   # (1, 3, H, W) uint8
    probs = session.run(["probabilities"], {"images": x})[0]
    print(json.load(open("labels.json"))[int(probs.argmax())])
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.data.preprocess import Preprocess, normalize
from cnnlab.records.io import write_json

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_TOLERANCE = 1e-4     # max |probability difference| between the exported file and PyTorch
ONNX_OPSET = 17             # the legacy exporter's target; the torch.export fallback writes DYNAMO_OPSET
DYNAMO_OPSET = 18           # the lowest opset the torch.export-based exporter writes natively
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ExportMismatch(CnnlabError):
    """The exported file was written but its probabilities differ from PyTorch's by more than the tolerance.

    A CnnlabError, so any handler of those reports it cleanly; the CLI should catch this subclass first
    and exit with status 1 (the export ran but its result is wrong) rather than 2 (a usage error). The file
    is left in place so it can be inspected."""


class InferenceModule(nn.Module):
    """A trained model with its input scaling: uint8 RGB (N, 3, S, S) -> softmax probabilities (N, K).

    Computes exactly what `Preprocess` does when the input is already input_size (its `normalize`: x/255,
    then (x - mean) / (std + 1e-6) when the run has mean/std), followed by the model and a softmax.
    mean/std are buffers so they travel inside the exported file."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        self.input_size = int(preprocess.input_size)
        has_norm = preprocess.mean is not None
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
                             if has_norm else None)
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
                             if has_norm else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(normalize(images, self.mean, self.std)), dim=1)


def check_tolerance(diff: float, tolerance: float = EXPORT_TOLERANCE) -> None:
    """Raise ExportMismatch when `diff` (from export_model) is above tolerance or not a number."""
    if not (diff <= tolerance):   # also catches NaN
        raise ExportMismatch(
            f"the exported model's probabilities differ from PyTorch's by {diff:.3g} (tolerance {tolerance:g}); "
            f"the model has operations that export differently (data-dependent control flow, custom ops): "
            f"try the other --format, or simplify the model's forward")


def export_model(model: nn.Module, preprocess: Preprocess, classes: list[str], fmt: str, out: Path,
                 sample: torch.Tensor) -> tuple[Path, float]:
    """Write `out` (ONNX or TorchScript) and labels.json beside it; return (out, max |prob difference|).

    `sample` is a uint8 batch (N, 3, input_size, input_size) of real inputs, used to trace the model and
    then to compare the file with PyTorch at batch N and at batch 1. The model is exported from an fp32,
    eval-mode copy on the CPU, so the caller's model is left untouched (device, dtype, train mode).
    The file is written under a temporary name and renamed once it loads and runs: a failed export
    never leaves a half-written file at `out`. A large difference is returned, not raised: pass it to
    `check_tolerance`."""
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise CnnlabError(f"unknown export format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    sample = _check_sample(sample, preprocess.input_size)
    module = InferenceModule(_fp32_cpu_copy(model), preprocess).eval()
    batches = _batches(sample)
    reference = []
    with torch.no_grad():
        for b in batches:
            try:
                reference.append(module(b))
            except Exception as e:  # noqa: BLE001 - a model that cannot run at all cannot be exported
                raise CnnlabError(f"the model fails in PyTorch on a batch of {len(b)} images ({_first_line(e)}); "
                                  f"it must accept any batch size to be exported") from None
    _check_classes(reference[0], classes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")
    try:
        if fmt == "onnx":
            _export_onnx(module, batches[0], tmp)
            got = _run_onnx(tmp, batches)
        else:
            _export_torchscript(module, batches[0], tmp)
            got = _run_torchscript(tmp, batches)
        for r, g in zip(reference, got):
            if tuple(g.shape) != tuple(r.shape):
                raise _broken(fmt, len(r), ValueError(f"output shape {tuple(g.shape)}, expected {tuple(r.shape)}"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(out.with_name("labels.json"), [str(c) for c in classes])
    diff = max(float((r - g.float()).abs().max()) for r, g in zip(reference, got))
    return out, diff


def onnxruntime_snippet(path: str | Path, input_size: int, *, image_size: int | None = None,
                        eval_crop: float = 1.0) -> str:
    """Python lines that classify one image with the ONNX file and labels.json, with onnxruntime alone.

    ImageOps.fit crops the central square and resizes it: the same view as cnnlab's shorter-side resize
    and centre crop. When the run's image_size differs from input_size (transfer runs), pass image_size and
    eval_crop so the lines also take the central eval_crop of the image_size square, as Preprocess does."""
    path = Path(path)
    size = int(image_size or input_size)
    image = f'ImageOps.fit(Image.open("image.jpg").convert("RGB"), ({size}, {size}), Image.BILINEAR)'
    if size != input_size:
        c = max(1, round(size * eval_crop))
        top = (size - c) // 2
        image += f".crop(({top}, {top}, {top + c}, {top + c}))"
        if c != input_size:
            image += f".resize(({input_size}, {input_size}), Image.BILINEAR)"
    return "\n".join([
        "import json, numpy as np, onnxruntime as ort",
        "from PIL import Image, ImageOps",
        f'session = ort.InferenceSession("{path.as_posix()}", providers=["CPUExecutionProvider"])',
        f"image = {image}",
        "x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]   # (1, 3, H, W) uint8",
        f'probs = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": x}})[0]',
        f'print(json.load(open("{path.with_name("labels.json").as_posix()}"))[int(probs.argmax())])',
    ]) + "\n"


# ---------------------------------------------------------------- checks


def _require_onnx() -> None:
    """onnx and onnxruntime are an optional extra; say how to get them instead of an ImportError."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise CnnlabError(f"ONNX export needs the onnx and onnxruntime packages ({e.name} is missing): "
                          f"pip install 'cnnlab[onnx]'") from None


def _fp32_cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32, eval-mode CPU copy of the model, unwrapped from torch.compile and (D)DP wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def _check_sample(sample: torch.Tensor, input_size: int) -> torch.Tensor:
    """The sample must be what the exported graph takes: uint8 (N, 3, input_size, input_size)."""
    if not isinstance(sample, torch.Tensor) or sample.dtype != torch.uint8 or sample.ndim != 4 \
            or tuple(sample.shape[1:]) != (3, input_size, input_size) or len(sample) == 0:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        dtype = getattr(sample, "dtype", "")
        raise CnnlabError(f"the export sample must be a non-empty uint8 batch (N, 3, {input_size}, {input_size}) "
                          f"of test images at the network's input size, got {shape} {dtype}")
    return sample.detach().cpu().contiguous()


def _batches(sample: torch.Tensor) -> list[torch.Tensor]:
    """The export batch (at least 2 images, so no exporter takes the batch size for a constant 1) and a
    batch of 1, whose agreement proves the batch axis is dynamic."""
    first = sample if len(sample) >= 2 else sample.repeat(2, 1, 1, 1)
    return [first, first[:1].clone()]


def _check_classes(probs: torch.Tensor, classes: list[str]) -> None:
    """labels.json must have one name per model output."""
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise CnnlabError(f"the model gives outputs of shape {tuple(probs.shape)} but there are {len(classes)} "
                          f"class names; pass the class list the model was trained on")


def _broken(fmt: str, n: int, e: Exception) -> CnnlabError:
    """The exported file cannot run at batch n: most often a batch size frozen into the graph."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CnnlabError(f"the exported {fmt} model fails at batch size {n} ({msg[:300]}); the model's forward "
                          f"probably uses the batch size as a constant (e.g. x.view(32, -1)): use x.flatten(1)")


# ---------------------------------------------------------------- ONNX


def _export_onnx(module: InferenceModule, x: torch.Tensor, path: Path) -> None:
    """Legacy (TorchScript-based) exporter first, torch.export-based one if it fails (see module doc)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)      # the legacy exporter is a deliberate choice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the numerical check is the arbiter
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return
    except Exception as e:  # noqa: BLE001 - any failure: try the other exporter before giving up
        legacy_error = e
    try:
        _export_onnx_dynamo(module, x, path)
    except Exception as e:  # noqa: BLE001
        raise CnnlabError(f"cannot export the model to ONNX: the TorchScript-based exporter failed "
                          f"({_first_line(legacy_error)}) and so did the torch.export-based one "
                          f"({_first_line(e)}); try --format torchscript") from None


def _export_onnx_dynamo(module: InferenceModule, x: torch.Tensor, path: Path) -> None:
    """torch.onnx.export(dynamo=True): one self-contained file, dynamic batch, progress output swallowed."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise CnnlabError("the torch.export-based ONNX exporter needs onnxscript: pip install 'cnnlab[onnx]'") from None
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=DYNAMO_OPSET, external_data=False,
                          optimize=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={INPUT_NAME: {0: batch}})


def _run_onnx(path: Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The exported file's probabilities on each batch, from onnxruntime on the CPU."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for b in batches:
        try:
            out.append(torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: b.numpy()})[0]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _broken("ONNX", len(b), e) from None
    return out


# ---------------------------------------------------------------- TorchScript


def _export_torchscript(module: InferenceModule, x: torch.Tensor, path: Path) -> None:
    """torch.jit.trace (see module doc) and torch.jit.save; check_trace off: the check below is stricter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)           # torch.jit is deprecated in torch 2.14
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(module, (x,), check_trace=False)
        except Exception as e:  # noqa: BLE001
            raise CnnlabError(f"cannot trace the model for TorchScript ({_first_line(e)}); "
                              f"try --format onnx") from None
        torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The saved file, loaded back with torch.jit.load, run on each batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    out = []
    with torch.no_grad():
        for b in batches:
            try:
                out.append(loaded(b))
            except Exception as e:  # noqa: BLE001
                raise _broken("TorchScript", len(b), e) from None
    return out


def _first_line(e: Exception) -> str:
    """A one-line reason for an error message: exception type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, weights: str = "auto",
               n_check: int = 16, trust_code: bool = False) -> tuple[Path, float]:
    """Export a run's model (uint8 RGB in at its input size, probabilities out; labels.json beside it),
    checked against PyTorch on real test images of the run's data. Returns (file, max |difference|).
    trust_code: as for load_model (a `package.module:function` model runs code the folder names)."""
    from cnnlab.data import load_dataset
    from cnnlab.data.preprocess import center_crop
    from cnnlab.inference.model import load_model
    run = load_model(run_dir, weights, "cpu", trust_code)
    pre = run.preprocess
    try:
        ds = load_dataset(run.config.data, quiet=True)
    except CnnlabError as e:
        raise CnnlabError(f"export {run_dir}: the check needs real images of the run's data ({e})") from None
    x = ds.x_test[:n_check]
    if x.shape[-1] != pre.input_size:       # the exported file takes images already at the network's size
        x = center_crop(x.float(), pre.eval_crop, pre.input_size).round().clamp(0, 255).to(torch.uint8)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = Path(out) if out else Path(run_dir) / "export" / f"model{suffix}"
    return export_model(run.model, pre, run.classes, fmt, out, x)
