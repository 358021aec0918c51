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
    # rows of x_train that are the validation split (an image folder's val/), instead of [data] val_fraction
    val_rows: torch.Tensor | None = None
    # lines about what the source chose for the user (image size, classes, layout): printed by a run
    notes: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        shape = "x".join(map(str, self.x_train.shape[2:])) if self.x_train.ndim == 4 else f"{self.x_train.shape[1]} features"
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
                f"{self.num_classes} classes, {shape}")


# A source takes its DataConfig and returns (x_train, y_train, x_test, y_test, class_names) as numpy
# arrays (uint8 NHWC or NCHW, int labels) before class selection, optionally followed by a dict of extras:
# "classes" (the class spec it resolved, replacing [data] classes), "val" (bool mask over the training rows
# that are the validation split) and "notes" (lines for the run).
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
        xtr, ytr, xte, yte, names, *more = SOURCES[cfg.source](cfg, quiet=quiet)
    extras = more[0] if more else {}
    val = extras.get("val")
    if skipped:
        print(skipped_summary(cfg.source, skipped), file=sys.stderr)
    keep = resolve_classes(extras.get("classes", cfg.classes), names, cfg.source)
    files = {}
    for split, x, y, cap in (("train", xtr, ytr, cfg.max_train_per_class), ("test", xte, yte, cfg.max_test_per_class)):
        mask = None
        if split == "train" and val is not None:      # train and val rows capped as their own splits
            mask = np.zeros(len(y), dtype=bool)
            mask[~val] = first_per_class(np.asarray(y)[~val], keep, cap)
            mask[val] = first_per_class(np.asarray(y)[val], keep, cfg.max_test_per_class)
            val = val[mask]
        xs, ys = select(x, y, keep, cap, mask)
        if xs is x and isinstance(x, np.memmap) and x.ndim == 4 and x.shape[1] == 3:
            files[f"x_{split}"] = RowFile.of(x)       # still the whole file: batches can be read from it
        if split == "train":
            xtr, ytr = xs, ys
        else:
            xte, yte = xs, ys
    return Dataset(to_nchw(xtr), torch.from_numpy(ytr), to_nchw(xte), torch.from_numpy(yte),
                   [names[k] for k in keep], cfg.source, files, skipped,
                   None if val is None else torch.from_numpy(np.flatnonzero(val)), list(extras.get("notes", [])))


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


def first_per_class(labels: np.ndarray, keep, cap: int | list[int]) -> np.ndarray:
    """Boolean mask of the records whose label is in `keep`, at most `cap` of each class (0 = all), in
    record order: the one "first N per class" rule of every source (CIFAR, CUB, image folders). A list
    `cap` gives each class of `keep` its own cap, in the same order (an imbalanced set on purpose)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = list(keep)
    mask = np.isin(labels, np.asarray(keep, dtype=np.int64))
    if isinstance(cap, list):
        if len(cap) != len(keep):
            raise DataError(f"[data] max_train_per_class lists {len(cap)} caps but {len(keep)} classes are "
                            f"selected; give one cap per class of [data] classes, in its order (0 = all)")
        caps = np.zeros(max(int(labels.max(initial=0)), max(keep)) + 1, dtype=np.int64)
        caps[keep] = [c or np.iinfo(np.int64).max for c in cap]
        cap = caps[np.where(mask, labels, keep[0])]
    if np.any(cap):
        order = np.argsort(labels, kind="stable")           # records grouped by class, record order inside
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = np.empty(len(labels), dtype=np.int64)
        rank[order] = np.arange(len(labels)) - starts       # position of each record within its class
        mask &= rank < cap
    return mask


def select(x: np.ndarray, y: np.ndarray, keep: list[int], cap: int,
           mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the listed classes (relabelled 0..k-1) and at most `cap` images of each, in record order (or
    the rows of `mask`). When every image is kept, `x` itself comes back (a memory-mapped cache is not copied)."""
    y = np.asarray(y, dtype=np.int64)
    remap = np.full(max(int(y.max(initial=0)), max(keep)) + 1, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    mask = first_per_class(y, keep, cap) if mask is None else mask
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


def train_val_split(ds: Dataset, cfg: DataConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training and validation indices of a run (and `cnnlab evaluate --split val`), with their notes:
    an image folder's val/ when it has one; else `split_train_val`, where an image folder's records are
    sorted by class, so a Keras `last` / `first` split (a practice config used as a base) would hold out
    whole classes: it becomes stratified, as Keras's image_dataset_from_directory shuffles before splitting."""
    if ds.val_rows is not None:
        is_val = torch.zeros(len(ds.y_train), dtype=torch.bool)
        is_val[ds.val_rows] = True
        return torch.nonzero(~is_val).flatten(), ds.val_rows, []
    mode, notes = cfg.val_split, []
    if cfg.source == "imagefolder" and mode in ("last", "first") and cfg.val_fraction > 0:
        mode = "stratified"
        notes.append(f"[data] val_split = {cfg.val_split!r} (Keras fit's unshuffled split) would hold out only the "
                     f"{cfg.val_split} classes of an image folder, whose images are sorted by class: using a "
                     f"seeded stratified split instead")
    tr, va = split_train_val(ds.y_train, cfg.val_fraction, mode, seed)
    return tr, va, notes
