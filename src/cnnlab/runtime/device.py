"""Devices and numeric precision: which device a run uses, and when bf16 autocast pays."""
from __future__ import annotations

import functools
import hashlib
import math
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from cnnlab.runtime import distributed


def resolve_device(name: str) -> torch.device:
    name = distributed.device_for(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from cnnlab.errors import ConfigError
        raise ConfigError(f"device = {name!r} but no CUDA GPU is visible; use device = 'auto' or 'cpu'")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX, AVX512-BF16 on Intel and AMD Zen 4+),
    where oneDNN runs bf16 convolutions about 2-4x faster than fp32."""
    probe = getattr(torch._C._cpu, "_is_amx_tile_supported", None)
    if probe is not None and probe():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(precision: str, device: torch.device, model: nn.Module | None = None,
             shape: tuple[int, ...] | None = None, train: bool = True) -> bool:
    """bf16 autocast when asked, or for 'auto' where it is faster.

    CUDA with bf16 support: yes. A CPU without bf16 instructions (AVX2 only): no, oneDNN then emulates
    bf16 and every model is slower (benchmarks/README.md, "fp32 or bf16"). A CPU with AMX or AVX512-BF16:
    it depends on the model. bf16 pays on dense convolutions (ResNet50 ~2x with AVX512-BF16, ~4x with
    AMX), while depthwise convolutions (EfficientNet, MobileNet) have little arithmetic per byte and
    gain less or lose. So when the model and its input shape are given, 'auto' times one step of both
    on this machine and keeps the faster (`measured_bf16_faster`, cached per CPU and model)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_has_fast_bf16():
        return False
    if model is None or shape is None:
        return True
    return measured_bf16_faster(model, shape, device, train)


def precision_is_measured(precision: str, device: torch.device) -> bool:
    """Whether use_bf16 decides this case by timing the model (then it needs the model and input shape)."""
    return precision == "auto" and device.type == "cpu" and cpu_has_fast_bf16()


# ---------------------------------------------------------------- 'auto' on bf16-capable CPUs: measured

def model_signature(model: nn.Module) -> str:
    """The architecture (class, parameter names and shapes), not the weights: one measurement per family
    member and input shape serves every run of it."""
    h = hashlib.blake2b(digest_size=8)
    h.update(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
    return f"{type(model).__name__}-{h.hexdigest()}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_seconds(model: nn.Module, shape: tuple[int, ...], device: torch.device, bf16: bool, train: bool,
                 reps: int = 3) -> float:
    """Best-of-`reps` seconds of one forward (and backward when `train`) pass on a constant batch.

    In eval mode and without an optimizer step: BatchNorm statistics, weights and every random stream
    stay as they were, so measuring never changes a run's result."""
    was_training = model.training
    model.eval()
    x = torch.full(shape, 0.5, device=device)
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    best = math.inf
    try:
        for i in range(reps + 1):                # the first pass is a warm-up (oneDNN primitive creation)
            t0 = time.perf_counter()
            # the backward inside the grad-enabled block: a caller under no_grad (scoring a run that never
            # trained, e.g. a solved head) would otherwise get a loss without a graph
            with torch.set_grad_enabled(train):
                with autocast(device, bf16):
                    out = model(x).float()
                if train and out.requires_grad:
                    out.sum().backward()
            if i:
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return best


def measured_bf16_faster(model: nn.Module, shape: tuple[int, ...], device: torch.device, train: bool) -> bool:
    """Whether bf16 autocast runs a step of this model faster than fp32 on this CPU; measured once (a few
    seconds) and remembered in the cache folder's precision.json, keyed by CPU, torch, threads, model and
    input shape, so every later run of the same model on this machine makes the same choice."""
    from cnnlab.runtime.cache import cache_dir
    from cnnlab.records.io import read_json, write_json
    key = "|".join(map(str, (cpu_name(), torch.__version__, torch.get_num_threads(), model_signature(model),
                             tuple(shape), "train" if train else "eval")))
    path = cache_dir() / "precision.json"
    try:
        known = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        fp32 = step_seconds(model, shape, device, False, train)
        bf16 = step_seconds(model, shape, device, True, train)
        known[key] = {"fp32_s": fp32, "bf16_s": bf16, "bf16": bf16 < fp32}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    return bool(known[key]["bf16"])


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
