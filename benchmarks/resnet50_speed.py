"""ResNet50 at 224x224 on this machine: feature extraction and fine-tuning step images/s, cnnlab vs Keras.

Keras: ../shared/reference/keras_resnet50.py (fp32, as the practice ran it; batch 32).
cnnlab: timm resnet50 (random weights: speed does not depend on them) + the practice's Dense(400) head,
precision "auto" (bf16 autocast on CPUs with bf16 units / GPUs), channels_last, batch 32, the same loops the
engine runs (cnnlab.transfer.features.extract and Trainer.train_epoch). Extraction is timed eagerly and as cnnlab
runs a CUB-200-2011 split (5,994 images: compiled with inductor's freezing where cnnlab.transfer.features.should_compile
says so, after a compile whose seconds are printed); the ratio uses the latter.
Also prints the seconds per fine-tuning epoch of CUB-200-2010 (3,000 training images) implied by it.

Usage: python benchmarks/resnet50_speed.py [--no-keras] [--device cuda] [--batch 32] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import keras_available, run_keras

from cnnlab.data.preprocess import Preprocess
from cnnlab.runtime import allocator
from cnnlab.data.augment import Augmenter
from cnnlab.config import AugmentConfig, TrainConfig
from cnnlab.runtime.device import use_bf16
from cnnlab.training.engine import Batches, Trainer
from cnnlab.transfer.features import extract, should_compile
from cnnlab.models.backbones import TransferNet, create_backbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-keras", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed batches per measurement")
    ap.add_argument("--precision", default="auto")
    a = ap.parse_args()
    allocator.keep_freed_memory()             # as a cnnlab run on images of 64 px or more sets it
    dev = torch.device(a.device)
    bf16 = use_bf16(a.precision, dev)
    n = a.batch * a.steps
    x = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, device=dev)   # decoded-cache size
    y = torch.randint(0, 200, (n,), device=dev)
    backbone, nf, norm, size = create_backbone("resnet50", "none")

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def extraction(compile: bool) -> float:
        sync(); t0 = time.perf_counter()
        extract(backbone, x, Preprocess.from_normalizer(norm, x.shape[-1], size, 0.875), dev, bf16, a.batch, quiet=True, compile=compile)
        sync(); return n / (time.perf_counter() - t0)

    extract(backbone, x[:a.batch], Preprocess.from_normalizer(norm, x.shape[-1], size, 0.875), dev, bf16, a.batch, quiet=True, compile=False)  # warm-up
    eager = extraction(False)
    compiled = should_compile(backbone, 5994, size, dev, bf16)        # what a CUB-200-2011 split gets
    compile_s = 0.0
    if compiled:
        t0 = time.perf_counter()
        extract(backbone, x[:a.batch], Preprocess.from_normalizer(norm, x.shape[-1], size, 0.875), dev, bf16, a.batch, quiet=True, compile=True)
        compile_s = time.perf_counter() - t0
    fwd = extraction(True) if compiled else eager

    model = TransferNet(backbone, nf, 200, [400])
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=a.batch, precision=a.precision)
    tr = Trainer(model, cfg, dev, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0), Augmenter(AugmentConfig(random_resized_crop=True, hflip=True), size))
    tr.train_epoch(Batches(x[:a.batch], y[:a.batch]))                                        # warm-up
    sync(); t0 = time.perf_counter()
    tr.train_epoch(Batches(x, y))
    sync(); train = n / (time.perf_counter() - t0)

    how = f"compiled; eager {eager:.1f} img/s; compiling took {compile_s:.0f} s once" if compiled else "eager"
    print(f"cnnlab ({dev}, {'bf16' if bf16 else 'fp32'}, channels_last): extraction {fwd:.1f} img/s ({how}), "
          f"fine-tuning step {train:.1f} img/s -> CUB-200-2010 epoch (3,000 images) {3000 / train:.0f} s")
    out = {"device": str(dev), "precision": "bf16" if bf16 else "fp32", "cnnlab_fwd_img_s": round(fwd, 1),
           "cnnlab_fwd_eager_img_s": round(eager, 1), "extraction_compiled": compiled,
           "compile_s": round(compile_s, 1),
           "cnnlab_train_img_s": round(train, 1), "cub2010_epoch_s": round(3000 / train, 1)}
    if not a.no_keras and keras_available():
        k = run_keras("keras_resnet50.py")[0]
        print(f"Keras ({k['policy']}): extraction {k['fwd_img_s']} img/s, train step {k['train_img_s']} img/s "
              f"-> CUB-200-2010 epoch {3000 / k['train_img_s']:.0f} s")
        print(f"ratios: extraction {fwd / k['fwd_img_s']:.2f}x, fine-tuning {train / k['train_img_s']:.2f}x")
        out.update(keras_fwd_img_s=k["fwd_img_s"], keras_train_img_s=k["train_img_s"],
                   fwd_ratio=round(fwd / k["fwd_img_s"], 2), train_ratio=round(train / k["train_img_s"], 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
