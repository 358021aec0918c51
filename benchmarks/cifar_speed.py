"""Training speed of the practice's CIFAR recipes, cnnlab vs the Keras reference, measured in one run.

  BaseNet recipe: SGD, batch 64, no augmentation (Keras: ../shared/reference/keras_basenet.py)
  augmented recipe: BN-before-ReLU deeper net, Adam, batch 32, featurewise normalization, zoom 0.2 + flip
                    (Keras: keras_practice.py row 'bnpre', ImageDataGenerator, 30 epochs)

Both sides time the whole fit (training + per-epoch validation) and report training images/s
(= 90% of the training images x epochs / seconds), exactly as the Keras scripts compute it.

Usage: python benchmarks/cifar_speed.py [--epochs 3] [--aug-train 3000]
Needs the Keras reference venv (see ../shared/reference/README.md); KERAS_PYTHON points at its python.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import random_npz, run_keras, timed

from cnnlab.augment import Augmenter
from cnnlab.config import from_dict
from cnnlab.data import Dataset
from cnnlab.engine import Trainer, fit
from cnnlab.experiment import prepare_splits
from cnnlab.models import create_model


def cnnlab_fit(npz: Path, model: str, raw: dict, epochs: int) -> float:
    """Train images/s of cnnlab on the npz data with the given config tables (whole fit timed)."""
    d = np.load(npz)
    ds = Dataset(torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["y_train"]).long(),
                 torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["y_test"]).long(),
                 [str(i) for i in range(25)], "bench")
    cfg = from_dict({**raw, "data": {"source": "synthetic", "val_split": "first"}})
    dev = torch.device("cpu")

    sp = prepare_splits(ds, cfg.data, cfg.train.normalize, 0, dev)
    torch.manual_seed(0)
    tr = Trainer(create_model(model, 25), cfg.train, dev, 0, sp.normalizer, Augmenter(cfg.augment))
    # Timed like Keras's model.fit: every epoch (the first one's warm-up included) and its validation.
    _, dt = timed(lambda: fit(tr, sp.train, sp.val, epochs, progress="none"))
    return len(sp.train) * epochs / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5, help="BaseNet epochs timed on each side")
    ap.add_argument("--aug-train", type=int, default=3000, help="training images for the augmented recipe (30 epochs)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        big = random_npz(Path(tmp) / "basenet.npz", 12500, 2500, 25)
        k = run_keras("keras_basenet.py", "--epochs", str(a.epochs))[0]["train_img_per_s"]
        c = cnnlab_fit(big, "basenet", {"train": {"optimizer": "sgd", "batch_size": 64}}, a.epochs)
        rows = [("BaseNet, SGD, batch 64", k, c)]

        small = random_npz(Path(tmp) / "aug.npz", a.aug_train, 500, 25)
        kr = run_keras("keras_practice.py", str(small), "bnpre")[0]
        k = 0.9 * a.aug_train * kr["epochs_run"] / kr["seconds"]
        raw = {"train": {"optimizer": "adam", "batch_size": 32, "normalize": "featurewise"},
               "augment": {"zoom": 0.2, "hflip": True}}
        c = cnnlab_fit(small, "deepnet_bn_pre", raw, 30)
        rows.append(("BN-before-ReLU + zoom/flip, Adam, batch 32", k, c))
    print(f"\n{'recipe':<46}{'Keras img/s':>12}{'cnnlab img/s':>14}{'ratio':>8}")
    for name, k, c in rows:
        print(f"{name:<46}{k:>12.0f}{c:>14.0f}{c / k:>7.2f}x")
    print(json.dumps({name: {"keras": round(k, 1), "cnnlab": round(c, 1), "ratio": round(c / k, 2)} for name, k, c in rows}))


if __name__ == "__main__":
    main()
