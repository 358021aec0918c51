"""Where a user's images and their labels are: the image lists of an `imagefolder` source, by layout.

    DATA_DIR/train/<class>/*  + DATA_DIR/test/<class>/*          the test split is test/
    DATA_DIR/train/<class>/*  + DATA_DIR/val/<class>/*  [+ test/]  val/ is the validation split (and the test
                                                                 split when there is no test/)
    DATA_DIR/<class>/*        (or train/ alone)                  split into train and test by test_fraction
    [data] labels = "labels.csv"                                 rows of path,label[,split] (.tsv: tab)

A one-folder layout and a labels file without a split column are split by scikit-learn's train_test_split,
stratified and seeded by [data] split_seed (not the run's seed: every seed of a run, and every row of a
suite, is tested on the same images). Class names are folder names or label texts, sorted as Keras's
`image_dataset_from_directory` sorts them, in Unicode NFC form (a macOS folder name and the same name typed
in a CSV are one class). Each problem is one DataError naming the folder, file or line.
"""
from __future__ import annotations

import csv
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data.images import list_images
from cnnlab.errors import DataError, DataMissing

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
PATH_HEADERS = {"path", "file", "filename", "filepath", "file_path", "image", "image_path", "img"}
LABEL_HEADERS = {"label", "class", "category", "class_name", "target"}


@dataclass
class Layout:
    classes: list[str]                          # sorted class names; labels index them
    # split -> (image paths, labels): "train" always, "test" always, "val" when the layout names one
    splits: dict[str, tuple[list[Path], np.ndarray]]
    where: str                                  # the folder or labels file, for messages and the cache key
    notes: list[str] = field(default_factory=list)
    test_where: str = ""                        # the test folder, when it is one (its cache key)


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def find_layout(cfg: DataConfig) -> Layout:
    """The image lists of `cfg` (data_dir, labels, test_fraction, split_seed), all classes, uncapped."""
    if cfg.labels:
        return from_labels_file(cfg)
    if not cfg.data_dir:
        raise DataError("[data] source = 'imagefolder' needs data_dir = the folder of your images (or "
                        "--data-dir DIR), or labels = a CSV of path,label rows")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataMissing(f"imagefolder: {root} not found; expected {root}/train/<class>/<image> with "
                          f"test/ or val/ beside it, or {root}/<class>/<image>")
    if (root / "train").is_dir():
        return from_split_folders(root, cfg)
    for split in ("test", "val"):
        if (root / split).is_dir():
            raise DataError(f"imagefolder: {root / split} has no train/ beside it; put the training images "
                            f"in {root / 'train'}/<class>/<image>")
    return from_one_folder(root, cfg, root)


def class_folders(folder: Path) -> dict[str, Path]:
    """Class name -> folder, for the visible subfolders (".ipynb_checkpoints" and the like are not classes)."""
    return {nfc(d.name): d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _list(folders: dict[str, Path], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for k, name in enumerate(classes):
        if name in folders:
            files = [p for p in list_images(folders[name]) if not p.name.startswith(".")]
            paths += files
            labels += [k] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _training_classes(folder: Path) -> tuple[list[str], dict[str, Path]]:
    folders = class_folders(folder)
    if not folders:
        raise DataError(f"imagefolder: no class folders in {folder}; expected {folder}/<class>/<image>")
    _no_empty_class(folders)
    return sorted(folders), folders


def _no_empty_class(folders: dict[str, Path]) -> None:
    for d in folders.values():
        if not any(p for p in list_images(d) if not p.name.startswith(".")):
            raise DataError(f"imagefolder: class folder {d} has no images; add some or remove the folder")


def from_split_folders(root: Path, cfg: DataConfig) -> Layout:
    classes, train = _training_classes(root / "train")
    present = [s for s in ("val", "test") if (root / s).is_dir()]
    if not present:
        return from_one_folder(root / "train", cfg, root)
    splits = {"train": _list(train, classes)}
    for split in present:
        folders = class_folders(root / split)
        stray = [name for name in folders if name not in train]
        if stray:
            raise DataError(f"imagefolder: {folders[stray[0]]} is a class folder in {split}/ but not in train/ "
                            f"(train/ has {_names(classes)}); rename it to a training class or remove it")
        _no_empty_class(folders)
        splits[split] = _list(folders, classes)
        if not len(splits[split][0]):
            raise DataError(f"imagefolder: no images in the class folders of {root / split}")
    notes = []
    if "test" not in splits:
        splits["test"] = splits["val"]
        notes.append(f"imagefolder: no test/ beside train/ and val/ in {root}: val/ is the validation split "
                     f"and also the test split, so the test scores are on the images that chose the best epoch")
    return Layout(classes, splits, str(root / "train"), notes, str(root / "test") if "test" in present else "")


def from_one_folder(folder: Path, cfg: DataConfig, root: Path) -> Layout:
    """DATA_DIR/<class>/<image> (or train/ alone), split into train and test by test_fraction."""
    classes, folders = _training_classes(folder)
    paths, labels = _list(folders, classes)
    tr, te = split_pool(labels, classes, cfg, str(folder))
    notes = [] if folder == root else [
        f"imagefolder: no test/ or val/ beside {folder}: test_fraction = {cfg.test_fraction:g} of it is the test "
        f"split (stratified, split_seed = {cfg.split_seed})"]
    splits = {"train": ([paths[i] for i in tr], labels[tr]), "test": ([paths[i] for i in te], labels[te])}
    return Layout(classes, splits, f"{folder} (test_fraction {cfg.test_fraction:g}, split_seed {cfg.split_seed})",
                  notes)


def split_pool(labels: np.ndarray, classes: list[str], cfg: DataConfig, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (each sorted: record order) of one list of images, stratified and seeded."""
    from sklearn.model_selection import train_test_split
    counts = np.bincount(labels, minlength=len(classes))
    if (counts == 1).any():
        name = classes[int(np.flatnonzero(counts == 1)[0])]
        raise DataError(f"imagefolder: class {name!r} of {where} has only 1 image; a stratified train/test "
                        f"split needs at least 2 of each class (add images, or give test/ or val/ folders)")
    try:
        tr, te = train_test_split(np.arange(len(labels)), test_size=cfg.test_fraction, stratify=labels,
                                  random_state=cfg.split_seed)
    except ValueError as e:
        raise DataError(f"imagefolder: cannot hold out test_fraction = {cfg.test_fraction:g} of the "
                        f"{len(labels)} images of {where}, stratified over {len(classes)} classes ({e}); "
                        f"raise [data] test_fraction or add images") from None
    return np.sort(tr), np.sort(te)


def _names(classes: list[str]) -> str:
    return ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")


# ---------------------------------------------------------------- labels files

def labels_path(cfg: DataConfig) -> Path:
    path = Path(cfg.labels).expanduser()
    if not path.is_absolute() and cfg.data_dir:
        path = Path(cfg.data_dir).expanduser() / path
    return path


def read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, [path, label, split?]) of each non-empty row; a header row (path,label...) is dropped
    and, when it names its columns, picks them."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:       # -sig: Excel's byte-order mark
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f, delimiter=delimiter), 1)
                    if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"[data] labels: {path} is not a UTF-8 {'TSV' if delimiter == chr(9) else 'CSV'} file "
                        f"({e})") from None
    if not rows:
        raise DataError(f"[data] labels: {path} has no rows; expected path,label rows")
    head = [c.lower() for c in rows[0][1]]
    if head and head[0] in PATH_HEADERS | LABEL_HEADERS:
        cols = [next((i for i, c in enumerate(head) if c in names), None)
                for names in (PATH_HEADERS, LABEL_HEADERS, {"split", "subset", "fold"})]
        if cols[0] is None or cols[1] is None:
            raise DataError(f"[data] labels: {path} line 1: a header must name a path column ({'/'.join(sorted(PATH_HEADERS)[:3])}...) "
                            f"and a label column (label or class); got {','.join(rows[0][1])}")
        pick = [c for c in cols if c is not None]
        return [(n, [row[i] if i < len(row) else "" for i in pick]) for n, row in rows[1:]]
    return rows


def from_labels_file(cfg: DataConfig) -> Layout:
    path = labels_path(cfg)
    if not path.is_file():
        raise DataMissing(f"[data] labels = {cfg.labels!r}: {path} not found")
    rows = read_rows(path)
    widths = {len(r) for _, r in rows}
    items, seen = [], {}
    for n, row in rows:
        where = f"[data] labels: {path} line {n}"
        if len(row) not in (2, 3) or len(row) != len(rows[0][1]):
            raise DataError(f"{where}: expected {'path,label,split' if 3 in widths else 'path,label'} "
                            f"(every row alike), got {len(row)} fields")
        if not row[0] or not row[1]:
            raise DataError(f"{where}: empty {'path' if not row[0] else 'label'}")
        image = Path(row[0]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not cfg.skip_corrupt and not image.is_file():
            raise DataError(f"{where}: image {image} not found (paths are relative to the labels file's "
                            f"folder); fix the row, or set [data] skip_corrupt = true to skip missing images")
        if str(image) in seen:
            raise DataError(f"{where}: {row[0]} is listed twice (first on line {seen[str(image)]})")
        seen[str(image)] = n
        split = SPLIT_NAMES.get(row[2].lower()) if len(row) == 3 else None
        if len(row) == 3 and split is None:
            raise DataError(f"{where}: split {row[2]!r} is not train, val or test")
        items.append((n, image, nfc(row[1]), split))
    if len(rows[0][1]) == 2:
        classes = sorted({label for _, _, label, _ in items})
        labels = np.asarray([classes.index(label) for _, _, label, _ in items], dtype=np.int64)
        tr, te = split_pool(labels, classes, cfg, str(path))
        paths = [image for _, image, _, _ in items]
        splits = {"train": ([paths[i] for i in tr], labels[tr]), "test": ([paths[i] for i in te], labels[te])}
        return Layout(classes, splits, f"{path} (test_fraction {cfg.test_fraction:g}, split_seed {cfg.split_seed})")
    return _explicit_splits(items, path)


def _explicit_splits(items: list, path: Path) -> Layout:
    """Rows with a split column: the classes are those of the train rows."""
    classes = sorted({label for _, _, label, split in items if split == "train"})
    if not classes:
        raise DataError(f"[data] labels: {path} has no train rows (third column 'train')")
    index = {c: k for k, c in enumerate(classes)}
    splits: dict = {}
    for n, image, label, split in items:
        if label not in index:
            raise DataError(f"[data] labels: {path} line {n}: label {label!r} names no class: no train row has "
                            f"it (train classes: {_names(classes)})")
        splits.setdefault(split, ([], []))
        splits[split][0].append(image)
        splits[split][1].append(index[label])
    splits = {s: (p, np.asarray(y, dtype=np.int64)) for s, (p, y) in splits.items()}
    notes = []
    if "test" not in splits:
        if "val" not in splits:
            raise DataError(f"[data] labels: {path} has train rows only; mark some rows val or test, or drop the "
                            f"split column to split by test_fraction")
        splits["test"] = splits["val"]
        notes.append(f"[data] labels: {path} has no test rows: the val rows are the validation split and also "
                     f"the test split, so the test scores are on the images that chose the best epoch")
    return Layout(classes, splits, str(path), notes)
