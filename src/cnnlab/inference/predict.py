"""Class predictions for new images with a trained model, fed exactly as its test images were.

Every input, whatever its kind, goes through the same two steps as the data set did:

  1. `cnnlab.data.images.pil_to_array`: RGB conversion (grayscale, RGBA, CMYK, palette all become RGB),
     shorter side resized to `Preprocess.image_size`, centre crop -> uint8 (3, S, S). File paths are
     decoded with `load_image`, the very function that built the data set; arrays and tensors are turned
     into PIL images first, so no second copy of the resize logic exists to drift out of step;
  2. the one evaluation path (models/forward.py: the run's `Preprocess`, batching rule, layout and precision)
     -> model -> softmax, eval mode, no grad: a prediction's logits are those `cnnlab evaluate` computes.

Accepted inputs (one, or a list mixing any of them):
  - a file path (str or Path), or a folder's path: its image files, searched recursively and sorted by path
    (as `cnnlab predict` lists them: `find_images`), one result per image in that order;
  - a PIL image, in any mode;
  - a uint8 numpy array: (H, W) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA or (3, H, W); channels-last is
    assumed whenever the last axis has 3 or 4 entries. A 4-D array is a batch of such images;
  - a torch tensor: (C, H, W) or a batch (N, C, H, W), C = 3 (RGB) or 1 (grayscale). uint8 is taken as is;
    a floating tensor is taken to hold values in [0, 1] (what torchvision's ToTensor gives) and becomes
    uint8 by round(clamp(x, 0, 1) * 255). A normalised tensor (already mean/std-shifted) is NOT accepted
    in any meaningful way: pass the raw image instead.

`predict_files` is the command-line path: it walks folders, decodes a batch at a time, and reports files
it cannot read instead of stopping at the first one.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from cnnlab.data.images import IMAGE_EXTS, load_image, pil_to_array
from cnnlab.errors import CnnlabError, DataError
from cnnlab.data.preprocess import Preprocess
from cnnlab.data.stream import Batches
from cnnlab.models import forward
from cnnlab.models.forward import Scoring
from cnnlab.records.io import atomic_write

PREDICTION_FORMATS = (".csv", ".json")
# What Pillow raises for a file that is not an image, is truncated or is absurdly large.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class Predictor:
    """A trained model with its recorded preprocessing and class names, ready to label new images."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, classes: list[str],
                 device: torch.device | str = "cpu", batch_size: int | None = None, scoring: Scoring | None = None):
        self.scoring = scoring or Scoring()          # how images are batched and run (the run's, from its folder)
        # images decoded and run at a time: by default the run's evaluation batch, so that a prediction groups
        # images as the run's own scoring did (a batch's size can change the last bits of a CPU convolution)
        batch_size = self.scoring.batch_size(preprocess.input_size) if batch_size is None else batch_size
        if batch_size < 1:
            raise CnnlabError(f"prediction batch size must be at least 1, got {batch_size}")
        if not classes:
            raise CnnlabError("a Predictor needs the class names in label order; got an empty list")
        self.device = torch.device(device)
        # The caller's model is moved and put in eval mode in place: a copy would double the memory.
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.classes = [str(c) for c in classes]
        self.batch_size = int(batch_size)

    def probabilities(self, images) -> torch.Tensor:
        """Softmax probabilities (N, K) on the CPU, one row per image in input order (a batch counts N)."""
        out = [self.probabilities_of_arrays(chunk) for chunk in _chunks(
            (to_array(item, self.preprocess.image_size) for item in _items(images)), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def predict(self, images, topk: int = 5) -> list[list[tuple[str, float]]]:
        """The `topk` most likely (label, probability) pairs per image, best first; always a list per image."""
        return self.top(self.probabilities(images), topk)

    def probabilities_of_arrays(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """uint8 (3, image_size, image_size) arrays, already decoded -> probabilities (N, K) on the CPU."""
        if not arrays:
            return torch.empty(0, len(self.classes))
        x = torch.from_numpy(np.stack(arrays)).to(self.device)
        logits = forward.logits(self.model, self.preprocess, Batches(x, torch.zeros(len(x), dtype=torch.long)),
                                self.scoring, self.device)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise CnnlabError(f"the model gives outputs of shape {tuple(logits.shape)} but there are "
                              f"{len(self.classes)} class names; pass the class list the model was trained on")
        return torch.softmax(logits, dim=1).cpu()

    def top(self, probs: torch.Tensor, topk: int) -> list[list[tuple[str, float]]]:
        """Rows of probabilities -> [(label, prob), ...] best first, topk clipped to the number of classes."""
        k = _check_topk(topk, len(self.classes))
        values, index = probs.topk(k, dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, index)]


def _check_topk(topk: int, num_classes: int) -> int:
    """topk must be positive; more than the number of classes just means all of them."""
    if int(topk) < 1:
        raise CnnlabError(f"topk must be at least 1, got {topk}")
    return min(int(topk), num_classes)


# ---------------------------------------------------------------- inputs -> uint8 arrays


def _items(images) -> Iterator:
    """One image or many -> single images (a 4-D array/tensor is a batch and yields its images)."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    elif not isinstance(images, Iterable):
        raise CnnlabError(f"cannot predict on a {type(images).__name__}: pass a file path, PIL image, "
                          f"numpy array, torch tensor, or a list of them")
    for item in images:
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            yield from item
        elif isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            found = _walk(Path(item))        # as `cnnlab predict` reads a folder: its images, sorted by path
            if not found:
                raise DataError(f"{item}: {NO_IMAGES}")
            yield from found
        else:
            yield item


NO_IMAGES = (f"no image files in this folder or below (looked for {', '.join(sorted(IMAGE_EXTS))}; "
             f"hidden files skipped)")


def to_array(item, size: int) -> np.ndarray:
    """One image of any accepted kind -> uint8 (3, size, size), exactly as the data set decoded files."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return load_image(Path(item), size)
        except FileNotFoundError:
            raise DataError(f"{item}: image file not found") from None
        except _DECODE_ERRORS as e:
            raise DataError(f"{item}: cannot read image ({e}); check that it is an image file Pillow reads") from None
    return pil_to_array(to_pil(item), size)


def to_pil(item) -> Image.Image:
    """PIL images pass through; arrays and tensors become PIL images (see the module doc for layouts)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        return _tensor_to_pil(item)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item)
    raise CnnlabError(f"cannot predict on a {type(item).__name__}: pass a file path, PIL image, "
                      f"uint8 numpy array or torch tensor")


def _array_to_pil(a: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, 3), (H, W, 4) or (3, H, W) -> PIL image in mode L, RGB or RGBA."""
    if a.dtype != np.uint8:
        raise CnnlabError(f"numpy images must be uint8 (0-255), got {a.dtype}; convert with "
                          f"(a * 255).round().astype(np.uint8) if it holds values in [0, 1]")
    if a.ndim == 3 and a.shape[-1] not in (3, 4) and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[-1] == 3 else "RGBA")
    raise CnnlabError(f"cannot read a numpy image of shape {a.shape}: use (H, W), (H, W, 3), (H, W, 4) or (3, H, W)")


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor, C in {1, 3}; uint8 as is, floating point taken as [0, 1] -> PIL image."""
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise CnnlabError(f"cannot read a tensor image of shape {tuple(t.shape)}: use (3, H, W), (1, H, W) "
                          f"or a batch (N, 3, H, W)")
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise CnnlabError(f"tensor images must be uint8 (0-255) or floating point in [0, 1], got {t.dtype}")
    return _array_to_pil(t.permute(1, 2, 0).numpy())  # channels-last: no guessing for a tensor


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of at most n items, consumed lazily so a long input never sits in memory at once."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- files and folders


def find_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively (sorted) to the image files in them.

    A file named explicitly is kept whatever its suffix (the user asked for it), and so is a path that
    does not exist: `predict_files` then reports it as a failure next to the others instead of stopping.
    Inside folders only suffixes in IMAGE_EXTS count, and hidden files and folders (".DS_Store",
    macOS "._x.jpg" resource forks, ".git") are skipped. Each file is listed once."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out, seen = [], set()
    for p in map(Path, paths):
        for f in (_walk(p) if p.is_dir() else [p]):
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _walk(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted, hidden entries skipped, symlinked folders not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    return sorted(found)


def _decode_file(path: Path, size: int) -> np.ndarray | str:
    """The file's uint8 array, or why it could not be read (a message, never an exception)."""
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a folder"
    try:
        return load_image(path, size)
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except _DECODE_ERRORS as e:
        return f"cannot decode image: {e}"


def predict_files(predictor: Predictor, paths: list[str | Path], topk: int = 5,
                  batch_size: int | None = None) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Predict every image file in `paths` (folders expanded with `find_images`).

    Returns (rows, failures): rows {"path": Path, "top": [(label, prob), ...]} for the images read, in
    input order; failures (path, reason) for missing, unreadable or non-image files. Files are decoded
    batch_size at a time (threads: Pillow releases the GIL while decoding), so memory stays bounded
    however many files there are, and one bad file never stops the others."""
    batch_size = predictor.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise CnnlabError(f"batch size must be at least 1, got {batch_size}")
    _check_topk(topk, len(predictor.classes))
    size = predictor.preprocess.image_size
    rows, failures = [], []
    # a folder without images is a failure of its own: else `cnnlab predict RUN emptydir` says nothing at all
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    failures += [(Path(p), NO_IMAGES) for p in paths if Path(p).is_dir() and not _walk(Path(p))]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        for chunk in _chunks(find_images(paths), batch_size):
            decoded = list(pool.map(lambda p: _decode_file(p, size), chunk))
            good = [(p, a) for p, a in zip(chunk, decoded) if isinstance(a, np.ndarray)]
            failures += [(p, a) for p, a in zip(chunk, decoded) if isinstance(a, str)]
            if good:
                top = predictor.top(predictor.probabilities_of_arrays([a for _, a in good]), topk)
                rows += [{"path": p, "top": t} for (p, _), t in zip(good, top)]
    return rows, failures


# ---------------------------------------------------------------- output


def format_table(rows: list[dict], topk: int) -> str:
    """An aligned text table: path, then one "label (prob)" column per rank."""
    k = max([min(topk, len(r["top"])) for r in rows] or [max(1, topk)])
    table = [["path"] + [f"top{i + 1}" for i in range(k)]]
    table += [[str(r["path"])] + [f"{label} ({prob:.3f})" for label, prob in r["top"][:k]] for r in rows]
    widths = [max(len(row[c]) for row in table if c < len(row)) for c in range(k + 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def check_predictions_path(out: str | Path) -> str:
    """The output format (".csv" or ".json") of `out`; call it before predicting to fail early on a typo."""
    suffix = Path(out).suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise CnnlabError(f"{out}: cannot write predictions as '{suffix or '(no suffix)'}'; "
                          f"name the file with one of {', '.join(PREDICTION_FORMATS)}")
    return suffix


def write_predictions(rows: list[dict], out: Path) -> None:
    """Write rows as CSV (path, label_1, prob_1, ..., label_k, prob_k) or JSON ([{path, top: [{label, prob}]}]).

    Written atomically: a killed process leaves the previous file or none, never half a table."""
    out = Path(out)
    suffix = check_predictions_path(out)
    with atomic_write(out) as f:
        if suffix == ".json":
            json.dump([{"path": str(r["path"]), "top": [{"label": label, "prob": float(p)} for label, p in r["top"]]}
                       for r in rows], f, indent=2)
            f.write("\n")
            return
        k = max([len(r["top"]) for r in rows] or [0])
        w = csv.writer(f)
        w.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")])
        for r in rows:
            w.writerow([str(r["path"])] + [v for label, p in r["top"] for v in (label, float(p))])
