"""Frozen-backbone features, computed once and cached on disk, memory-mapped.

The practice ran ResNet50 over every image for each experiment. Here the pooled features of a
(backbone, weights, data, image size, preprocessing) combination are computed once and stored under
the cache folder as `<key>.npy` (float32 (N, D)) with `<key>.json` (what they are the features of); every
later run with the same combination maps the file in a fraction of a second, and the head then trains on
(N, D) vectors in seconds. Extraction reads the images batch by batch from their file, on a background
thread (cnnlab.data.stream), and writes the features as they come, so neither the images nor the features
are ever held whole in memory; a feature cache larger than the memory budget is streamed like images.
Each view (the image, its mirror) is cached on its own: a run that averages both shares the image's
features with the runs that use only those.

A long extraction on the CPU (should_compile) runs the backbone compiled by inductor with freezing
(weights folded in as constants, BatchNorm folded into the convolutions, oneDNN weights prepacked). On a
2-core AVX2 EPYC, with the allocator setting of a cnnlab run (cnnlab.runtime.allocator), that is 1.39x the eager
speed for EfficientNet-Lite0, 1.09x for ConvNeXt-tiny and 1.02-1.10x for ResNet50 (1.5x with glibc's
default allocator, whose page faults slow eager more), for ~25-35 s of compiling once per process
(benchmarks/extract_compile.py). Its features agree with eager ones to float rounding (~1e-6 relative).
Under bf16 autocast the gain is smaller for dense networks and the bar higher (COMPILE_MIN_IMAGES_BF16);
compiled and eager bf16 features of ResNet50 are identical, Lite0's differ as bf16 and fp32 ones do (a linear
probe on 2,000 CIFAR-10 images scored 0.732 compiled, 0.731 eager, 0.736 fp32). Shorter extractions and GPUs
stay eager (not measured to pay there); a compile that fails (no C++ compiler, say) falls back to eager
with a warning.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cnnlab.runtime.cache import cache_dir
from cnnlab.data.stream import Rows, RowFile, Streamed, rows_of
from cnnlab.runtime.device import autocast
from cnnlab.models.backbones import mean_of_views
from cnnlab.data.preprocess import Preprocess, layout


def data_fingerprint(x: torch.Tensor, y: torch.Tensor, file: RowFile | None = None) -> str:
    """Identifies the images: their bytes, or for a memory-mapped cache its file (never read whole)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(x.shape)).encode())
    if file is not None:
        h.update(file.fingerprint().encode())
    else:
        h.update(x.contiguous().numpy().tobytes() if x.device.type == "cpu" else x.cpu().numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """Identifies the backbone's actual weights, whatever their origin (tag, local file, random + seed)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# Compiling takes ~25-35 s and saves 2-30% of the eager time: from 2,000 images at ImageNet sizes it about
# breaks even for the least helped backbones measured (ResNet50, ConvNeXt-tiny) and wins for depthwise
# ones. The rule counts work, not seconds, so that the same run makes the same choice (and features) every
# time.
COMPILE_MIN_IMAGES = 2000
# bf16 autocast (a CPU with AVX512-BF16 or AMX) gains less from compiling where oneDNN's bf16 convolutions
# are already efficient (on an AVX512-BF16 EPYC: ResNet50 1.08-1.14x, ConvNeXt-tiny 1.22x, Lite0 1.82x, after
# 14-22 s of compiling), so it waits for a longer split: CUB-200-2011's (~5,900 images, three passes with the
# mirror and the test split) repays the compile even for ResNet50; CUB-200-2010's 3,000 would only break even.
COMPILE_MIN_IMAGES_BF16 = 5000
COMPILE_FLOPS = 1e12     # and this much work: a small net extracts 2,000 images faster than inductor compiles it

_compiled: tuple[tuple, nn.Module] | None = None   # the last compiled backbone, reused by the next extraction
_compile_failed = False                            # once it failed in this process, do not pay for it again


def flops_per_image(backbone: nn.Module, size: int, device: torch.device) -> float:
    """Floating-point operations of one forward pass at size x size (torch's FLOP counter: convolutions
    and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last))
    return float(counter.get_total_flops())


def should_compile(backbone: nn.Module, n: int, size: int, device: torch.device, bf16: bool) -> bool:
    """Compile for extraction only where it was measured to pay: on the CPU, long enough."""
    if _compile_failed or device.type != "cpu" or n < (COMPILE_MIN_IMAGES_BF16 if bf16 else COMPILE_MIN_IMAGES):
        return False
    try:
        return n * flops_per_image(backbone, size, device) >= COMPILE_FLOPS
    except Exception:       # a backbone the FLOP counter cannot follow: extract eagerly, as always worked
        return False


def compiled_backbone(backbone: nn.Module, device: torch.device) -> nn.Module:
    """A private eval-mode copy of the backbone compiled with inductor's freezing. The copy matters: freezing
    bakes the weights into the compiled code, so a later change to the backbone's own weights (fine-tuning
    after a linear probe) must not reach a stale compiled version; the one-entry cache is keyed by the
    weights' fingerprint for the same reason."""
    global _compiled
    key = (id(backbone), weights_fingerprint(backbone), str(device))
    if _compiled is None or _compiled[0] != key:
        frozen = copy.deepcopy(backbone).eval().requires_grad_(False)
        _compiled = (key, torch.compile(frozen, dynamic=False))
    return _compiled[1]


def release_compiled() -> None:
    """Drop the compiled copy (a second set of the backbone's weights) once the features are made."""
    global _compiled
    _compiled = None


def _forward_compiled(fn: nn.Module, xb: torch.Tensor, desc: str, bar: tqdm) -> tuple:
    """One full batch through the compiled backbone (one compiled graph: fixed shapes): (features, fn), or
    (None, None) when compiling failed: compiling is an optimization, never worth failing a run over."""
    global _compile_failed
    if bar.n == 0:
        bar.set_postfix_str("compiling the backbone first (once, about 30 s)")
    try:
        # freezing is read when the graph is compiled (the first call); the CUDA-less build's note about
        # CUDA_HOME is noise on a CPU
        with torch._inductor.config.patch(freezing=True), _quiet_logger("torch.utils.cpp_extension"):
            return fn(xb.contiguous(memory_format=torch.channels_last)), fn
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"{desc}: compiling the backbone failed ({type(e).__name__}: {first}); extracting eagerly")
        _compile_failed = True
        return None, None
    finally:
        if bar.n == 0:
            bar.set_postfix_str("")


@contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@torch.no_grad()
def extract(backbone: nn.Module, x: torch.Tensor, preprocess: Preprocess, device: torch.device,
            bf16: bool, batch_size: int = 64, desc: str = "features", quiet: bool = False,
            mirror: bool = False, file: RowFile | None = None, out: Path | None = None,
            compile: bool | None = None) -> torch.Tensor:
    """Pooled features of uint8 images through the run's Preprocess (its centre view at the input size;
    mirrored: flipped left-right after it, as TransferNet flips its input), forward; float32 (N, D) on CPU.
    The images are read from `file` when given (streamed); with `out` the features go into that .npy file as
    they come, and the result is the file memory-mapped. `compile`: run the backbone compiled (None:
    should_compile decides)."""
    backbone.eval().to(device, memory_format=torch.channels_last)
    if compile is None:
        compile = should_compile(backbone, len(x), preprocess.input_size, device, bf16)
    fn = compiled_backbone(backbone, device) if compile else None
    images = Streamed(rows_of(x, file), torch.zeros(len(x), dtype=torch.long, device=device), device)
    slices = [slice(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
    parts, writer = [], None
    with tqdm(total=len(x), unit="img", desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        for xb, _ in images.batches(None, slices):
            xb = preprocess(xb, channels_last=False)
            xb = layout(xb.flip(-1) if mirror else xb)
            with autocast(device, bf16):
                f = None
                if fn is not None and len(xb) == batch_size:     # a short last batch runs eagerly
                    f, fn = _forward_compiled(fn, xb, desc, bar)
                if f is None:
                    f = backbone(xb)
                f = f.flatten(1).float().cpu()
            if out is None:
                parts.append(f)
            else:
                writer = writer or NpyWriter(out, (len(x), f.shape[1]))
                writer.write(f.numpy())
            bar.update(len(xb))
    if out is None:
        return torch.cat(parts)
    (writer or NpyWriter(out, (0, 0))).close()
    return torch.from_numpy(np.load(out, mmap_mode="c"))


class NpyWriter:
    """A float32 (N, D) .npy file written row block by row block, made visible at `path` only when complete."""

    def __init__(self, path: Path, shape: tuple):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": tuple(shape)})

    def write(self, block: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)


def cached_features(backbone: nn.Module, identity: dict, x: torch.Tensor, y: torch.Tensor, preprocess: Preprocess,
                    device: torch.device, bf16: bool, split: str, quiet: bool = False, flip_average: bool = False,
                    file: RowFile | None = None) -> tuple[torch.Tensor, bool]:
    """Features of one split, from the cache when present (a memory-mapped tensor); with flip_average the
    mean of the image's and its mirror's (what TransferNet(flip_average=True) computes), cached as well.
    `file`: the images' file, when they are memory-mapped. Returns (features, all loaded from cache)."""
    feats, hit = feature_array(backbone, identity, x, y, preprocess, device, bf16, split, quiet, flip_average, file)
    return torch.from_numpy(feats), hit


def feature_array(backbone: nn.Module, identity: dict, x: torch.Tensor, y: torch.Tensor, preprocess: Preprocess,
                  device: torch.device, bf16: bool, split: str, quiet: bool = False,
                  flip_average: bool = False, file: RowFile | None = None) -> tuple[np.memmap, bool]:
    """cached_features as the memory-mapped array itself (RowFile.of(it) streams it)."""
    ident = {**identity, "split": split, "data": data_fingerprint(x, y, file), "size": preprocess.input_size,
             "crop": preprocess.eval_crop, "norm": preprocess.normalizer().state_dict(), "bf16": bf16}
    views = []
    for mirror in ((False, True) if flip_average else (False,)):
        # the image's own key has no "view": caches made before views existed stay valid
        view = {**ident, "view": "mirror"} if mirror else ident
        feats = load_cached(view, len(x))
        views.append((feats, feats is not None))
        if feats is None:
            extract(backbone, x, preprocess, device, bf16, desc=f"features {split}{' mirrored' * mirror}",
                    quiet=quiet, mirror=mirror, file=file, out=feature_path(view))
            write_identity(view)
            views[-1] = (load_cached(view, len(x)), False)
    hit = all(h for _, h in views)
    if not flip_average:
        return views[0][0], hit
    mean = {**ident, "view": "flip_average"}
    feats = load_cached(mean, len(x))
    if feats is None:
        average(views[0][0], views[1][0], feature_path(mean))
        write_identity(mean)
        feats = load_cached(mean, len(x))
    return feats, hit


def average(a: np.memmap, b: np.memmap, path: Path, chunk: int = 8192) -> None:
    """mean_of_views of two cached views, a block of rows at a time, into its own cache file."""
    ra, rb = Rows(RowFile.of(a)), Rows(RowFile.of(b))
    writer = NpyWriter(path, a.shape)
    for i in range(0, len(a), chunk):
        writer.write(mean_of_views([ra[i:i + chunk], rb[i:i + chunk]]).numpy())
    writer.close()


def feature_path(ident: dict) -> Path:
    return cache_dir() / "features" / f"{feature_key(ident)}.npy"


def load_cached(ident: dict, n: int) -> np.memmap | None:
    """The cached features (memory-mapped, copy-on-write) when the file is there and is what `ident` describes."""
    path = feature_path(ident)
    try:
        if json.loads(path.with_suffix(".json").read_text()) == json.loads(json.dumps(ident)):
            feats = np.load(path, mmap_mode="c")
            if feats.ndim == 2 and len(feats) == n and feats.dtype == np.float32:
                return feats
    except (OSError, ValueError):
        pass  # absent or unreadable: compute it
    return None


def write_identity(ident: dict) -> None:
    """Written after the features: a .json beside a .npy says the .npy is complete."""
    from cnnlab.records.io import write_json
    write_json(feature_path(ident).with_suffix(".json"), ident)
