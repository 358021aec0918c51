"""How an image file becomes a stored sample: RGB, shorter side resized to S, centre-cropped to S x S.

`pil_to_array` is the one definition (data sets and `cnnlab.inference.predict` both use it); `read_image` is the unit
of the decoded-image cache (`cnnlab.data.store`, which decodes each image of a data set once), and
`decode` decodes a short list of files into one array.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cnnlab.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)     # what a bad image file raises


def pil_to_array(im: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> uint8 (3, S, S): RGB, shorter side resized to `size`, centre-cropped (size 0: as is).

    The one definition of how an image becomes a stored sample; data sets (via `load_image`) and
    `cnnlab.inference.predict` both call it, so a new image is fed exactly as the training images were."""
    im = im.convert("RGB")
    if size:
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return pil_to_array(im, size)


def read_image(path: Path, size: int) -> np.ndarray | Exception:
    """One file -> uint8 (3, S, S), or the exception that says why it cannot be read."""
    try:
        return load_image(path, size)
    except UNREADABLE as e:
        return e


def decode(paths: list[Path], size: int, skip_corrupt: bool, what: str, quiet: bool = False):
    """Decode a list of images in parallel threads (PIL releases the GIL while decoding) into one array.
    Returns (array of the readable ones, kept mask)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        out = list(tqdm(ex.map(lambda p: read_image(p, size), paths), total=len(paths), desc=f"decode {what}",
                        disable=quiet, unit="img"))
    keep = np.array([not isinstance(o, Exception) for o in out], dtype=bool)
    for p, o in zip(paths, out):
        if isinstance(o, Exception):
            if not skip_corrupt:
                raise DataError(f"{what}: cannot read image {p} ({o}); remove or replace it, "
                                f"or set [data] skip_corrupt = true to skip unreadable images")
            warnings.warn(f"{what}: skipping unreadable image {p} ({o})", stacklevel=2)
    imgs = [o for o in out if not isinstance(o, Exception)]
    if not imgs:
        raise DataError(f"{what}: no readable images")
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise DataError(f"{what}: images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}...); "
                        f"set [data] image_size to resize them to one size")
    return np.stack(imgs), keep


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
