"""A user's own images: root/{train,test}/<class>/<image>, decoded once into the memory-mapped uint8 cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data import register_source
from cnnlab.data.images import list_images
from cnnlab.data.store import cached_images
from cnnlab.errors import DataError, DataMissing


def _scan(split_dir: Path, classes: list[str], cap: int, keep: set[int]):
    """Image files of the kept classes (file-name order inside a class), at most `cap` of each."""
    from cnnlab.data import first_per_class
    paths, labels = [], []
    for k in sorted(keep):
        files = list_images(split_dir / classes[k]) if (split_dir / classes[k]).is_dir() else []
        paths += files
        labels += [k] * len(files)
    mask = first_per_class(np.asarray(labels, dtype=np.int64), keep, cap)
    return [p for p, m in zip(paths, mask) if m], np.asarray(labels, dtype=np.int64)[mask]


@register_source("imagefolder")
def imagefolder(cfg: DataConfig, quiet: bool = False):
    if not cfg.data_dir:
        raise DataError("[data] source = 'imagefolder' needs data_dir = the folder holding train/ and test/")
    root = Path(cfg.data_dir).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataMissing(f"imagefolder: {root / split} not found; expected {root}/train/<class>/<image> "
                            f"and {root}/test/<class>/<image>")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"imagefolder: no class folders in {root / 'train'}")
    # Scan only the selected classes and cap early: no need to decode images that will be dropped.
    from cnnlab.data import resolve_classes
    keep = set(resolve_classes(cfg.classes, classes, "imagefolder"))
    out = []
    for split, cap in (("train", cfg.max_train_per_class), ("test", cfg.max_test_per_class)):
        paths, labels = _scan(root / split, classes, cap, keep)
        if not paths:
            raise DataError(f"imagefolder: no images found under {root / split}")
        x, kept = cached_images(paths, cfg.image_size, cfg.skip_corrupt, f"imagefolder {root / split}", quiet)
        out += [x, labels[kept]]
    return out[0], out[1], out[2], out[3], classes
