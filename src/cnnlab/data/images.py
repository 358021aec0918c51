"""Decoding image files once into a uint8 cache, so training never touches a JPEG.

`decode_cached(paths, size, ...)` returns an (N, 3, S, S) uint8 array: each image converted to RGB
(grayscale, CMYK, palette all become RGB), resized so its shorter side is S and center-cropped to SxS
(or kept as is when size is 0 and all images share one size). The result is stored as .npy in the cache
folder under a key made of the file list, sizes, modification times and S: any change to the source or
the size makes a new key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cnnlab.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 1


def cache_dir() -> Path:
    base = os.environ.get("CNNLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"
    return Path(base)


def pil_to_array(im: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> uint8 (3, S, S): RGB, shorter side resized to `size`, centre-cropped (size 0: as is).

    The one definition of how an image becomes a stored sample; data sets (via `_load_one`) and
    `cnnlab.predict` both call it, so a new image is fed exactly as the training images were."""
    im = im.convert("RGB")
    if size:
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _load_one(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return pil_to_array(im, size)


def decode(paths: list[Path], size: int, skip_corrupt: bool, what: str, quiet: bool = False):
    """Decode images in parallel threads (PIL releases the GIL while decoding). Returns (array, kept mask)."""
    def job(p):
        try:
            return _load_one(p, size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return e

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        out = list(tqdm(ex.map(job, paths), total=len(paths), desc=f"decode {what}", disable=quiet, unit="img"))
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


def cache_key(paths: list[Path], size: int, extra: str = "") -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{extra}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_cached(paths: list[Path], size: int, skip_corrupt: bool, what: str, quiet: bool = False):
    """decode() with an on-disk cache. Returns (images uint8 NCHW, kept mask over paths)."""
    key = cache_key(paths, size, f"{what}|{skip_corrupt}")
    folder = cache_dir() / "images"
    arr_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if arr_path.is_file() and meta_path.is_file():
        try:
            keep = np.array(json.loads(meta_path.read_text())["keep"], dtype=bool)
            return np.load(arr_path, mmap_mode="r"), keep
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    arr, keep = decode(paths, size, skip_corrupt, what, quiet)
    folder.mkdir(parents=True, exist_ok=True)
    from cnnlab.runs import atomic_write  # local import: runs imports nothing from data
    with atomic_write(arr_path, "wb") as f:
        np.save(f, arr)
    with atomic_write(meta_path, "w") as f:
        json.dump({"what": what, "size": size, "n": len(paths), "keep": keep.tolist()}, f)
    return arr, keep


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
