"""Devices and numeric precision: which device a run uses, and when bf16 autocast pays."""
from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path

import torch

from cnnlab import distributed


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


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast when asked, or for 'auto' where it is fast: CUDA with bf16, or a CPU with bf16 units."""
    if precision == "bf16":
        return True
    if precision == "auto":
        return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return False


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
