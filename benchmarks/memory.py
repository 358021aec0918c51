"""Peak resident memory (VmHWM) of a CIFAR run, of a CUB-200-2010 frozen-feature run and of a CUB-200-2010
fine-tuning run, each measured in a fresh process.

The data are random uint8 images of the real sizes (CUB cannot be downloaded here; peak memory does not
depend on pixel values): CIFAR as the practice's subset (12,500 train + 2,500 test at 32x32), CUB-200-2010
as its decoded cache (3,000 train + 3,033 test at 256x256, 1.19 GB). Each run goes through the engine's own
path (prepare_splits: validation split, uint8 on the device; Trainer; features.extract) but only for a
few steps: after the first steps the peak no longer grows (the allocator reuses the same blocks).

  cifar            BN-before-ReLU net, Adam, batch 32, featurewise normalization, zoom + flip: one epoch
  cub2010-frozen   ResNet50 feature extraction (batch 64, 224 centre crop; compiled, as a CUB split is) for
                   --steps batches, then the practice's Dense(400) head trained one epoch on features of
                   all 6,033 images
  cub2010-finetune ResNet50 + Dense(400) head, SGD, batch 32, random-resized-crop + flip to 224, --steps
                   steps, then validation of 300 images

Each run is measured twice: with glibc's allocator as it comes, and with the settings cnnlab applies when a
run starts (cnnlab.runtime.allocator: freed memory stays in the process).

Usage: python benchmarks/memory.py [--steps 4] [--only cifar,cub2010-frozen,cub2010-finetune]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS now, VmHWM the peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dataset(n_train: int, n_test: int, size: int, classes: int):
    from cnnlab.data import Dataset
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g),
                   torch.arange(n_train) % classes, torch.randint(0, 256, (n_test, 3, size, size), dtype=torch.uint8,
                                                                    generator=g), torch.arange(n_test) % classes,
                   [str(i) for i in range(classes)], "random")


def child(mode: str, steps: int, keep: bool) -> dict:
    from cnnlab.runtime import allocator
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import AugmentConfig, DataConfig, TrainConfig
    from cnnlab.training.engine import Batches, Trainer, fit
    from cnnlab.experiments.prepare import prepare_splits
    from cnnlab.transfer.features import extract
    from cnnlab.models import create_model
    from cnnlab.models.backbones import TransferNet, create_backbone
    from cnnlab.data.preprocess import Preprocess
    cpu = torch.device("cpu")
    if keep:
        assert allocator.keep_freed_memory(), "cnnlab.runtime.allocator did not apply here (not glibc, or MALLOC_* set)"
    base = vm("VmRSS")                                  # torch and cnnlab imported, nothing else
    if mode == "cifar":
        ds = dataset(12500, 2500, 32, 25)
        sp, pre = prepare_splits(ds, DataConfig(val_fraction=0.1), "featurewise", 0, cpu)
        cfg = TrainConfig(optimizer="adam", batch_size=32, epochs=1)
        tr = Trainer(create_model("deepnet_bn_pre", 25), cfg, cpu, 0, pre,
                     Augmenter(AugmentConfig(zoom=0.2, hflip=True)))
        fit(tr, sp.train, sp.val)
        tr.evaluate(sp.test)
    else:
        ds = dataset(3000, 3033, 256, 200)
        backbone, nf, norm, size = create_backbone("resnet50", "none")
        sp, _ = prepare_splits(ds, DataConfig(val_fraction=0.1), "none", 0, cpu)
        if mode == "cub2010-frozen":
            extract(backbone, sp.train.x[:64 * steps], Preprocess.from_normalizer(norm, sp.train.x.shape[-1], size, 0.875), cpu, False, 64, quiet=True, compile=True)
            feats = torch.randn(len(ds.x_train) + len(ds.x_test), nf)     # what the cache then holds
            head = TransferNet(backbone, nf, 200, [400]).head
            fit(Trainer(head, TrainConfig(optimizer="adam", batch_size=32, epochs=1), cpu, 0),
                Batches(feats[:2700], ds.y_train[:2700]), Batches(feats[2700:3000], ds.y_train[2700:]))
        else:
            cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=32, epochs=1)
            tr = Trainer(TransferNet(backbone, nf, 200, [400]), cfg, cpu, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0),
                         Augmenter(AugmentConfig(random_resized_crop=True, hflip=True), size), image_size=size,
                         eval_crop=0.875)
            tr.train_epoch(Batches(sp.train.x[:32 * steps], sp.train.y[:32 * steps]))
            tr.evaluate(sp.val)
    data_mb = (ds.x_train.numel() + ds.x_test.numel()) / 2 ** 20
    return {"mode": mode, "baseline_mib": round(base), "data_mib": round(data_mb), "peak_mib": round(vm("VmHWM"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="cifar,cub2010-frozen,cub2010-finetune")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.steps, a.child[1] == "cnnlab")))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("| run | allocator | data (uint8) | after import | peak resident | peak - import - data |\n"
          "|---|---|---|---|---|---|")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for mode in a.only.split(","):
        for setting in ("default", "cnnlab"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, setting, "--steps", str(a.steps)],
                                 capture_output=True, text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {mode} | {setting} | {r['data_mib']} MiB | {r['baseline_mib']} MiB | {r['peak_mib']} MiB | "
                  f"{r['peak_mib'] - r['baseline_mib'] - r['data_mib']} MiB |", flush=True)


if __name__ == "__main__":
    main()
