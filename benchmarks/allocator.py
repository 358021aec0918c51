"""glibc's default allocator settings against the ones cnnlab sets when a run starts (cnnlab.runtime.allocator):
extraction (eager and compiled) and a fine-tuning step of large backbones at 224.

By default glibc serves every allocation above a threshold (at most 32 MB) with its own mmap and returns it
to the system on free, and trims the heap often; a large network's activations are then page-faulted in,
zeroed by the kernel, on every batch. cnnlab keeps freed memory in the process instead. The settings cannot
be compared in one process (a heap grown under one setting serves the other's allocations), so each
measurement is a fresh child process, alternately (default, cnnlab, default, cnnlab, ...), and each figure is
the best of its rounds. Random weights except Lite0's (speed does not depend on them), fp32, channels_last,
batch 32. Also prints the share of CPU time spent in the kernel.

Usage: python benchmarks/allocator.py [--rounds 2] [--images 128] [--models resnet50,lite0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from common import benchmark_backbone

from cnnlab.data.preprocess import Preprocess
from cnnlab.runtime import allocator
from cnnlab.data.augment import Augmenter
from cnnlab.config import AugmentConfig, TrainConfig
from cnnlab.training.engine import Batches, Trainer
from cnnlab.transfer.features import extract
from cnnlab.models.backbones import TransferNet

def cpu_seconds() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def timed(fn, n: int) -> tuple[float, float]:
    """(images/s, share of the CPU time spent in the kernel)."""
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    return n / dt, (s1 - s0) / max(1e-9, (u1 - u0) + (s1 - s0))


def measure(name: str, n: int, batch: int, keep: bool) -> dict:
    """In a child process: the three jobs under one allocator setting."""
    if keep:
        assert allocator.keep_freed_memory(), "cnnlab.runtime.allocator did not apply here (not glibc, or MALLOC_* set)"
    backbone, nf, norm, size = benchmark_backbone(name)
    cpu = torch.device("cpu")
    x = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    net = TransferNet(backbone, nf, 10, [400])
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=batch)
    trainer = Trainer(net, cfg, cpu, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0), Augmenter(AugmentConfig(random_resized_crop=True, hflip=True), size))
    def features(images: torch.Tensor, compile: bool) -> torch.Tensor:
        return extract(backbone, images, Preprocess.from_normalizer(norm, images.shape[-1], size, 0.875), cpu, False, batch, quiet=True, compile=compile)

    out = {}
    features(x[:batch], False)                                                                     # warm-up
    out["extraction, eager"] = timed(lambda: features(x, False), n)
    features(x[:batch], True)                                                                      # compile
    out["extraction, compiled"] = timed(lambda: features(x, True), n)
    trainer.train_epoch(Batches(x[:batch], y[:batch]))                                             # warm-up
    out["fine-tuning step"] = timed(lambda: trainer.train_epoch(Batches(x, y)), n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="resnet50,lite0")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.images, a.batch, a.child[1] == "cnnlab")))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {a.images} images at 224, "
          f"batch {a.batch}, best of {a.rounds} alternated child processes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    results = {}
    for name in a.models.split(","):
        best: dict = {}
        for _ in range(a.rounds):
            for setting in ("default", "cnnlab"):
                cmd = [sys.executable, __file__, "--child", name, setting, "--images", str(a.images),
                       "--batch", str(a.batch)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                for job, r in json.loads(out.strip().splitlines()[-1]).items():
                    best.setdefault(job, {}).setdefault(setting, (0.0, 0.0))
                    best[job][setting] = max(best[job][setting], tuple(r))
        results[name] = {}
        for job, by in best.items():
            (d, dk), (c, ck) = by["default"], by["cnnlab"]
            results[name][job] = {"default_img_s": round(d, 1), "cnnlab_img_s": round(c, 1), "ratio": round(c / d, 2),
                                  "kernel_share_default": round(dk, 2), "kernel_share_cnnlab": round(ck, 2)}
            print(f"{name} {job}: default {d:.1f} img/s (kernel {dk:.0%} of CPU time), cnnlab {c:.1f} img/s "
                  f"(kernel {ck:.0%}) -> {c / d:.2f}x", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
