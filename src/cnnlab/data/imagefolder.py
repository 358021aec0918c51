"""A user's own images, in any layout `data.layouts` reads, decoded once into the memory-mapped uint8 cache.

Defaults that suit photos (what a user of Keras's `image_dataset_from_directory` expects):
  - `image_size = 0` keeps images as they are only when they all share one size of at most 256 pixels (a
    CIFAR-like folder); other folders (photos of mixed sizes, large ones) are resized to 256x256 (shorter
    side, centre crop), Keras's default image_size, with one line saying so;
  - an integer `classes` counts folders, which photos are not sorted by: a count above the folder's
    (the practice's 25) takes all classes, one below it the first N in sorted order, each with one line.
A val/ folder (or val rows) is stored after the training images in one cache file: the Dataset's `val_rows`
name them, and they are the validation split instead of [data] val_fraction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data import register_source
from cnnlab.data.layouts import Layout, find_layout, nfc
from cnnlab.data.store import MixedSizes, cached_images
from cnnlab.errors import DataError

PHOTO_SIZE = 256            # Keras image_dataset_from_directory's default (256, 256)
PROBE = 64                  # image headers read to decide image_size = 0 (spread over the whole list)


@register_source("imagefolder")
def imagefolder(cfg: DataConfig, quiet: bool = False):
    layout = find_layout(cfg)
    notes = list(layout.notes)
    keep = folder_classes(cfg.classes, layout.classes, layout.where, notes)
    # only the selected classes, capped early: no need to decode images that will be dropped
    from cnnlab.data import first_per_class
    lists = {}
    for split, (paths, labels) in layout.splits.items():
        mask = first_per_class(labels, keep, cfg.max_train_per_class if split == "train" else cfg.max_test_per_class)
        lists[split] = ([p for p, m in zip(paths, mask) if m], labels[mask])
        if not lists[split][0]:
            raise DataError(f"imagefolder: no images of the selected classes in the {split} split of {layout.where}")
    size = cfg.image_size
    if not size:
        size, note = photo_size([p for paths, _ in lists.values() for p in paths])
        notes += [note] if note else []
    try:
        arrays = decode_splits(lists, layout, size, cfg.skip_corrupt, quiet)
    except MixedSizes:                  # the probe saw one size; an image it did not read has another
        size = PHOTO_SIZE
        notes.append(mixed_note("found while decoding them at their own size"))
        arrays = decode_splits(lists, layout, size, cfg.skip_corrupt, quiet)
    return (*arrays[:4], layout.classes, {"classes": keep, "val": arrays[4], "notes": notes})


def folder_classes(spec: int | list, classes: list[str], where: str, notes: list[str]) -> list[int]:
    """[data] classes for a folder: a count above the folder's takes all (with a line), names match in NFC."""
    from cnnlab.data import resolve_classes
    n = len(classes)
    if isinstance(spec, int) and spec > n:
        notes.append(f"[data] classes = {spec} but {where} has {n} classes: taking all {n} "
                     f"({', '.join(classes[:5])}{', ...' if n > 5 else ''}); a count such as the practice's 25 "
                     f"counts CIFAR's classes: write classes = 0 (all) or a list of names")
        spec = 0
    elif isinstance(spec, int) and 0 < spec < n:
        notes.append(f"[data] classes = {spec}: the first {spec} of the {n} classes of {where} in sorted order "
                     f"({', '.join(classes[:spec][:5])}{', ...' if spec > 5 else ''}); classes = 0 takes all")
    elif isinstance(spec, list):
        spec = [nfc(c) if isinstance(c, str) else c for c in spec]
    return resolve_classes(spec, classes, f"imagefolder {where}")


def photo_size(paths: list[Path]) -> tuple[int, str]:
    """image_size = 0: (0, "") when the probed images share one size of at most PHOTO_SIZE, else
    (PHOTO_SIZE, the line saying why they are resized)."""
    from PIL import Image

    from cnnlab.data.images import UNREADABLE
    sizes = set()
    for i in np.unique(np.linspace(0, len(paths) - 1, min(PROBE, len(paths))).astype(int)):
        try:
            with Image.open(paths[i]) as im:
                sizes.add(im.size)
        except UNREADABLE:
            pass                        # read_image says why, later
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        return PHOTO_SIZE, mixed_note(f"e.g. {a[0]}x{a[1]} and {b[0]}x{b[1]}")
    if sizes and max(next(iter(sizes))) > PHOTO_SIZE:
        w, h = next(iter(sizes))
        return PHOTO_SIZE, (f"[data] image_size = 0: the images are {w}x{h}, larger than {PHOTO_SIZE}: each is "
                            f"resized to {PHOTO_SIZE}x{PHOTO_SIZE} (shorter side, centre crop), as Keras's "
                            f"image_dataset_from_directory does; set [data] image_size to choose another size")
    return 0, ""


def mixed_note(example: str) -> str:
    return (f"[data] image_size = 0: the images have different sizes ({example}): each is resized to "
            f"{PHOTO_SIZE}x{PHOTO_SIZE} (shorter side, centre crop), as Keras's image_dataset_from_directory "
            f"does; set [data] image_size to choose another size")


def decode_splits(lists: dict, layout: Layout, size: int, skip_corrupt: bool, quiet: bool):
    """(x_train, y_train, x_test, y_test, val mask over the training rows or None). Train and val share one
    cache file (val rows last); a test split that is the val split is a view of those rows."""
    train_paths, train_labels = lists["train"]
    val_paths, val_labels = lists.get("val", ([], np.zeros(0, dtype=np.int64)))
    what = f"imagefolder {layout.where}" + (" + val" if val_paths else "")
    x, kept = cached_images(train_paths + val_paths, size, skip_corrupt, what, quiet)
    y = np.concatenate([train_labels, val_labels])[kept]
    is_val = np.arange(len(kept))[kept] >= len(train_paths)
    if layout.splits.get("test") is layout.splits.get("val") and val_paths:
        start = int((~is_val).sum())
        return x, y, rows_view(x, start, len(x)), y[start:], is_val
    test_paths, test_labels = lists["test"]
    xt, kept_t = cached_images(test_paths, size, skip_corrupt, f"imagefolder {layout.test_where or layout.where + ' test'}", quiet)
    return x, y, xt, test_labels[kept_t], (is_val if val_paths else None)


def rows_view(mm: np.memmap, start: int, stop: int) -> np.memmap:
    """Rows start:stop of a cache memmap as a memmap of its own (its `offset` right, so it streams too)."""
    row = int(np.prod(mm.shape[1:])) * mm.dtype.itemsize
    return np.memmap(mm.filename, dtype=mm.dtype, mode="c", offset=mm.offset + start * row,
                     shape=(stop - start, *mm.shape[1:]))
