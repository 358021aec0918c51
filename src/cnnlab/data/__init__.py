"""Data sources: each returns uint8 images (N, 3, H, W) with int64 labels and class names.

`load_dataset(cfg.data)` picks the source, applies the class selection and per-class caps, and returns
a `Dataset`; `split_train_val` holds out the validation part. Image sources (folders, CUB) return their
decoded-image cache memory-mapped (`store`): a tensor over the file, read only where it is indexed.
`cnnlab.data.stream` then puts each split on the training device when it fits the memory budget, and
streams it from that file in batches when it does not.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from cnnlab.config import DataConfig
from cnnlab.errors import DataError


@dataclass
class Dataset:
    x_train: torch.Tensor        # uint8 (N, 3, H, W)
    y_train: torch.Tensor        # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    name: str = ""
    # "x_train" / "x_test" -> the file (a RowFile) a memory-mapped x_train / x_test is read from; none in memory
    files: dict = field(default_factory=dict)
    # [data] skip_corrupt: the (path, reason) of each image left out; a run lists them in skipped_images.txt
    skipped: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        shape = "x".join(map(str, self.x_train.shape[2:])) if self.x_train.ndim == 4 else f"{self.x_train.shape[1]} features"
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
                f"{self.num_classes} classes, {shape}")


# A source takes its DataConfig and returns (x_train, y_train, x_test, y_test, class_names) as numpy
# arrays (uint8 NHWC or NCHW, int labels) before class selection.
SOURCES: dict[str, Callable] = {}


def register_source(name: str):
    def deco(fn):
        SOURCES[name] = fn
        return fn
    return deco


def load_dataset(cfg: DataConfig, quiet: bool = False) -> Dataset:
    from cnnlab.data import cifar, cub, imagefolder, synthetic  # noqa: F401  (register the sources)
    if cfg.source not in SOURCES:
        raise DataError(f"[data] source = {cfg.source!r} is not a data source; choose one of {', '.join(sorted(SOURCES))}")
    from cnnlab.data.images import skipped_images, skipped_summary
    from cnnlab.data.stream import RowFile
    with skipped_images() as skipped:         # one line for all skipped images, not one warning each
        xtr, ytr, xte, yte, names = SOURCES[cfg.source](cfg, quiet=quiet)
    if skipped:
        print(skipped_summary(cfg.source, skipped), file=sys.stderr)
    keep = resolve_classes(cfg.classes, names, cfg.source)
    files = {}
    for split, x, y, cap in (("train", xtr, ytr, cfg.max_train_per_class), ("test", xte, yte, cfg.max_test_per_class)):
        xs, ys = select(x, y, keep, cap)
        if xs is x and isinstance(x, np.memmap) and x.ndim == 4 and x.shape[1] == 3:
            files[f"x_{split}"] = RowFile.of(x)       # still the whole file: batches can be read from it
        if split == "train":
            xtr, ytr = xs, ys
        else:
            xte, yte = xs, ys
    return Dataset(to_nchw(xtr), torch.from_numpy(ytr), to_nchw(xte), torch.from_numpy(yte),
                   [names[k] for k in keep], cfg.source, files, skipped)


def resolve_classes(spec: int | list, names: list[str], source: str) -> list[int]:
    """Class spec -> source class indices, in the order they become labels 0..k-1."""
    n = len(names)
    if isinstance(spec, int):
        if spec == 0:
            return list(range(n))
        if spec > n:
            raise DataError(f"[data] classes = {spec} but {source} has only {n} classes")
        return list(range(spec))
    out = []
    for c in spec:
        if isinstance(c, str):
            if c not in names:
                raise DataError(f"[data] classes: {c!r} is not a class of {source} (e.g. {', '.join(names[:5])})")
            c = names.index(c)
        if not 0 <= c < n:
            raise DataError(f"[data] classes: index {c} is out of range for {source} (0..{n - 1})")
        out.append(c)
    if len(set(out)) != len(out):
        raise DataError("[data] classes: a class is listed twice")
    return out


def first_per_class(labels: np.ndarray, keep, cap: int) -> np.ndarray:
    """Boolean mask of the records whose label is in `keep`, at most `cap` of each class (0 = all), in
    record order: the one "first N per class" rule of every source (CIFAR, CUB, image folders)."""
    labels = np.asarray(labels, dtype=np.int64)
    mask = np.isin(labels, np.fromiter(keep, dtype=np.int64))
    if cap:
        order = np.argsort(labels, kind="stable")           # records grouped by class, record order inside
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = np.empty(len(labels), dtype=np.int64)
        rank[order] = np.arange(len(labels)) - starts       # position of each record within its class
        mask &= rank < cap
    return mask


def select(x: np.ndarray, y: np.ndarray, keep: list[int], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the listed classes (relabelled 0..k-1) and at most `cap` images of each, in record order.
    When every image is kept, `x` itself comes back (a memory-mapped cache is not copied)."""
    y = np.asarray(y, dtype=np.int64)
    remap = np.full(max(int(y.max(initial=0)), max(keep)) + 1, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    mask = first_per_class(y, keep, cap)
    return (x if mask.all() else x[mask]), remap[y[mask]]


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC or NCHW -> an NCHW tensor; a contiguous NCHW array (a memmap too) is wrapped, not copied."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 4 and t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def split_train_val(y: torch.Tensor, fraction: float, mode: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and validation parts.

    stratified (default): each class gives `fraction` of its images, chosen by the seed.
    random: a seeded random `fraction` of all images.
    last:  the last `fraction` of the records, unshuffled, like Keras `fit(validation_split=...)`.
           A trap when records are sorted by class: validation then holds only the last classes.
    first: the first `fraction`, unshuffled, like Keras `ImageDataGenerator(validation_split=...)`.
    """
    n = len(y)
    n_val = int(n * fraction)
    if n_val == 0:
        return torch.arange(n), torch.arange(0)
    if mode in ("last", "first"):
        idx = torch.arange(n)
        return (idx[: n - n_val], idx[n - n_val:]) if mode == "last" else (idx[n_val:], idx[:n_val])
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        perm = torch.randperm(n, generator=g)
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    val = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        k = int(round(len(idx) * fraction))
        if k == 0 and len(idx) >= 2:
            k = 1          # small classes still give one validation image each

        val.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx
