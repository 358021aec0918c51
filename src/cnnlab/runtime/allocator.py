"""Keep freed memory in the process: glibc's allocator settings for large tensors on the CPU.

By default glibc serves each allocation above a threshold (it adapts up to 32 MB) with its own mmap and
unmaps it on free, and returns free memory at the top of the heap to the system as soon as it passes a
trim threshold. A large network at 224x224 allocates activations of 50-100 MB per layer and batch, so every
batch page-faults them in again and the kernel zeroes every page. Measured on a 2-core AVX2 EPYC
(benchmarks/allocator.py, fresh processes): the kernel took 47% of the CPU time of an eager
EfficientNet-Lite0 extraction, and keeping freed memory made it 2.15x faster; ResNet50 extraction 1.30x,
fine-tuning steps 1.17x (ResNet50) and 1.26x (Lite0). PyTorch's CPU tuning guide gets the same effect by
preloading jemalloc or tcmalloc; a user should not have to, so cnnlab sets glibc's own knobs when a run
starts on large images: no mmap for allocations (M_MMAP_MAX = 0) and trimming only past 2 GB of free memory
at the top of the heap (M_TRIM_THRESHOLD, an int: its largest value).

The cost: memory freed by the process stays with the process, and the heap fragments (torch asks for
aligned blocks, so a freed block does not always fit the next request of its size; a loop allocating one
100 MB tensor settles at 500 MB more than without, after five rounds): peak resident memory rose 13-14% in
benchmarks/memory.py (CUB-200-2010 with ResNet50: frozen 3,438 -> 3,896 MiB, fine-tuning 5,801 -> 6,605
MiB). For 32x32 images it buys nothing (the practice's CIFAR recipes trained at the same speed within
noise, and the run peaked 24% higher: 906 -> 1,128 MiB), so a run applies it only when its network sees
images of LARGE_INPUT pixels or more. Not on other systems or C libraries (macOS, Windows, musl): there
this does nothing. Nor when the user chose an allocator already: jemalloc or tcmalloc in LD_PRELOAD, or
glibc's own MALLOC_* / GLIBC_TUNABLES settings, are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4      # glibc's <malloc.h>
LARGE_INPUT = 64          # image side from which a run keeps freed memory
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}


def _glibc_mallopt():
    """glibc's mallopt, or None where this is not Linux with glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def user_chose_allocator(environ=os.environ) -> bool:
    """True when the environment already picks the allocator or glibc's malloc settings."""
    preload = environ.get("LD_PRELOAD", "")
    return ("jemalloc" in preload or "tcmalloc" in preload or "GLIBC_TUNABLES" in environ
            or any(k.startswith("MALLOC_") for k in environ))


def keep_freed_memory() -> bool:
    """Apply KEEP to this process's glibc allocator (for the rest of the process: glibc's adaptive default
    cannot be switched back on); returns whether it applied."""
    mallopt = _glibc_mallopt()
    if mallopt is None or user_chose_allocator():
        return False
    return all(mallopt(k, v) == 1 for k, v in KEEP.items())
