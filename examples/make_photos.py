"""A folder of "own photos" in PyTorch's transfer-learning tutorial layout, made from a CIFAR-10 image folder:
OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg, each image resized to its own random size (96-480 pixels a
side, any aspect), as a phone's photos are mixed. Used by the README's "Your own photos" transcript.

    python examples/make_photos.py CIFAR10_JPEG_DIR OUT [--classes cat dog ship] [--train 200] [--val 50]

CIFAR10_JPEG_DIR is the `train/<class>/NNNN.jpg` folder of ../shared/data/cifar10-jpeg.tar.gz.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a folder of <class>/<image> (CIFAR-10's train/)")
    ap.add_argument("out")
    ap.add_argument("--classes", nargs="+", default=["cat", "dog", "ship"])
    ap.add_argument("--train", type=int, default=200, help="images a class in train/")
    ap.add_argument("--val", type=int, default=50, help="images a class in val/")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    for name in a.classes:
        files = sorted((Path(a.source) / name).glob("*.jpg"))[: a.train + a.val]
        for i, f in enumerate(files):
            split = "train" if i < a.train else "val"
            out = Path(a.out) / split / name / f"IMG_{i:04d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            size = (rng.randint(96, 480), rng.randint(96, 480))
            Image.open(f).convert("RGB").resize(size, Image.BICUBIC).save(out, quality=90)


if __name__ == "__main__":
    main()
