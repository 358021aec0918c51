"""A deterministic, learnable data set for tests and offline demos: no download, no files.

Each class is a fixed random low-resolution colour template; an image is its class template, upsampled,
shifted by a few pixels, with per-image brightness and pixel noise. A small CNN learns it in a few epochs.
"""
from __future__ import annotations

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data import register_source


def make(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    templates = np.random.default_rng(1234).integers(0, 256, (num_classes, 3, 4, 4)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes                     # balanced, interleaved like shuffled records
    rep = -(-size // 4)
    big = templates.repeat(rep, axis=2).repeat(rep, axis=3)[:, :, :size, :size]
    x = big[y]
    shift = rng.integers(-2, 3, (n, 2))
    for i, (dy, dx) in enumerate(shift):              # data generation only; never in a training loop
        x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
    x = x * rng.uniform(0.7, 1.1, (n, 1, 1, 1)) + rng.normal(0, 40, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@register_source("synthetic")
def synthetic(cfg: DataConfig, quiet: bool = False):
    k = max(10, cfg.classes if isinstance(cfg.classes, int) else 0)
    size = cfg.image_size or 32
    xtr, ytr = make(cfg.synthetic_train, k, size, seed=1)
    xte, yte = make(cfg.synthetic_test, k, size, seed=2)
    return xtr, ytr, xte, yte, [f"class_{i:02d}" for i in range(k)]
