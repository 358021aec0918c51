"""cnnlab.runtime.allocator: freed memory stays in the process (no page faults when a large tensor is allocated
again), and an allocator the user chose is left alone."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from cnnlab.runtime.allocator import user_chose_allocator

# Allocate, fill and free a 64 MB block three times (glibc's malloc itself, as torch's CPU allocator calls it),
# counting the page faults of the last time.
PROBE = """
import ctypes, json, resource, sys
from cnnlab.runtime import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    libc.memset(block, 1, 64 << 20)
    libc.free(block)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(setting: str) -> dict:
    env = {"PATH": "/usr/bin:/bin"}                 # no MALLOC_* / LD_PRELOAD from the caller's environment
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = probe("default"), probe("keep")
    pages = (64 << 20) // 4096
    assert not default["applied"] and default["faults"] >= pages * 0.9     # mmap'd afresh: every page faults
    assert kept["applied"] and kept["faults"] < pages * 0.1                 # the freed heap is reused


def test_an_allocator_the_user_chose_is_left_alone():
    assert not user_chose_allocator({"PATH": "/usr/bin"})
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert user_chose_allocator({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    assert user_chose_allocator({"MALLOC_ARENA_MAX": "2"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000000"})
    assert not user_chose_allocator({"LD_PRELOAD": "libasan.so"})
