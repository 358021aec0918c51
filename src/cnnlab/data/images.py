"""How an image file becomes a stored sample: RGB, shorter side resized to S, centre-cropped to S x S.

`pil_to_array` is the one definition (data sets and `cnnlab.inference.predict` both use it); `read_image` is the unit
of the decoded-image cache (`cnnlab.data.store`, which decodes each image of a data set once), and
`decode` decodes a short list of files into one array.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cnnlab.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)     # what a bad image file raises
REDUCING_GAP = 3.0          # resize's reducing_gap: a large image is first reduced to >= 3 x S, then resampled


def pil_to_array(im: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> uint8 (3, S, S): RGB, shorter side resized to `size`, centre-cropped (size 0: as is).

    The one definition of how an image becomes a stored sample; data sets (via `load_image`) and
    `cnnlab.inference.predict` both call it, so a new image is fed exactly as the training images were."""
    im = im.convert("RGB")
    if size:
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=REDUCING_GAP)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_image(path: Path, size: int) -> np.ndarray:
    """A file -> uint8 (3, S, S) as `pil_to_array` makes it. A JPEG many times larger than S is decoded at
    1/2, 1/4 or 1/8 scale (Pillow's draft: DCT scaling while decoding), so a 6000x6000 photo costs what a
    750x750 one does; it is still resized from at least REDUCING_GAP x S, so the result is the same picture.
    Smaller images decode exactly as without it."""
    with Image.open(path) as im:
        if size and min(im.size) >= 2 * REDUCING_GAP * size:
            im.draft(None, (int(REDUCING_GAP * size), int(REDUCING_GAP * size)))
        return pil_to_array(im, size)


def read_image(path: Path, size: int) -> np.ndarray | Exception:
    """One file -> uint8 (3, S, S), or the exception that says why it cannot be read."""
    try:
        return load_image(path, size)
    except UNREADABLE as e:
        return e


def wrong_size(path: Path, expect: tuple) -> ValueError | None:
    """Images kept at their own size (S = 0) must all be `expect` = (3, H, W): the reason one is not, read
    from its header alone (a 6000x6000 photo among 32x32 images is refused without decoding it); None when
    it fits or cannot be opened (read_image then says why)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UNREADABLE:
        return None
    if (3, h, w) == tuple(expect):
        return None
    return ValueError(f"size {w}x{h} differs from the first image's {expect[2]}x{expect[1]}; "
                      f"set [data] image_size to resize them to one size")


# Images skipped by [data] skip_corrupt while a data set loads: load_dataset collects them (`skipped_images`)
# for its one summary line and the run folder's skipped_images.txt, instead of one warning per image.
_SKIPPED: ContextVar[list | None] = ContextVar("cnnlab_skipped_images", default=None)


@contextmanager
def skipped_images() -> Iterator[list[tuple[str, str]]]:
    """Collects the (path, reason) of every image skipped inside the block."""
    token = _SKIPPED.set([])
    try:
        yield _SKIPPED.get()
    finally:
        _SKIPPED.reset(token)


def report_skipped(what: str, items: list[tuple[str, str]]) -> None:
    """Images skipped by skip_corrupt: into the collector of the load in progress, or, outside one, one line."""
    if not items:
        return
    collector = _SKIPPED.get()
    if collector is not None:
        collector.extend((str(p), reason) for p, reason in items)
    else:
        print(skipped_summary(what, items), file=sys.stderr)


def skipped_summary(what: str, items: list[tuple[str, str]]) -> str:
    path, reason = items[0]
    more = f" and {len(items) - 1} more" if len(items) > 1 else ""
    return (f"warning: {what}: skipped {len(items)} unreadable or missing image{'s' * (len(items) > 1)} "
            f"([data] skip_corrupt = true): {path} ({reason}){more}; a run lists them in skipped_images.txt")


def decode(paths: list[Path], size: int, skip_corrupt: bool, what: str, quiet: bool = False):
    """Decode a list of images in parallel threads (PIL releases the GIL while decoding) into one array.
    Returns (array of the readable ones, kept mask)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        out = list(tqdm(ex.map(lambda p: read_image(p, size), paths), total=len(paths), desc=f"decode {what}",
                        disable=quiet, unit="img"))
    keep = np.array([not isinstance(o, Exception) for o in out], dtype=bool)
    bad = [(p, o) for p, o in zip(paths, out) if isinstance(o, Exception)]
    if bad and not skip_corrupt:
        raise DataError(f"{what}: cannot read image {bad[0][0]} ({bad[0][1]}); remove or replace it, "
                        f"or set [data] skip_corrupt = true to skip unreadable images")
    report_skipped(what, [(p, f"{type(o).__name__}: {o}") for p, o in bad])
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
