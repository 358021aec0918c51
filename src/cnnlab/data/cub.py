"""Caltech-UCSD Birds: `cub200-2010` (the practice's version) and `cub200-2011`, from the official archives.

Layout inside the data folder (`resolve_data_dir`), as the official archives unpack:

    cub200-2010   <data>/CUB_200_2010/images.tgz, lists.tgz          (the two official archives)
                  <data>/CUB_200_2010/images/<class>/<file>.jpg      (from images.tgz)
                  <data>/CUB_200_2010/lists/{train,test,classes}.txt  (from lists.tgz)
                  6,033 images: 3,000 train / 3,033 test (the lists' split), 200 classes.
    cub200-2011   <data>/CUB_200_2011.tgz                            (the official archive)
                  <data>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
                                       classes.txt, images/<class>/<file>.jpg}
                  11,788 images: 5,994 train / 5,794 test (train_test_split.txt), 200 classes.

An extracted folder that is complete is used as is; otherwise the archive beside it is extracted (and
downloaded first when missing and `[data] download = true`). Offline or with downloads off, one DataError
names the file, its address and the folder to put it in. The archives are kept after extraction.

Records keep the official list order (sorted by class); labels are the class's position in classes.txt.
Class names are shown without the numeric prefix: `001.Black_footed_Albatross` -> `Black_footed_Albatross`
(these are the names `[data] classes` accepts; indices work too).

Images are decoded once by `store.cached_images` to `image_size` x `image_size` (default 256 when
image_size = 0: shorter side resized to 256, then center-cropped), converted to RGB (grayscale and CMYK
JPEGs exist in CUB). Models that see 224 crop it from the 256 image (random-resized crop in training, center
crop `eval_crop` at evaluation). The uint8 cache is one memory-mapped file per image list and size, so later
runs never decode a JPEG; a changed file re-decodes its own row, another size makes another file. Only the
selected classes (and the first `max_*_per_class` of each) are decoded. An unreadable image is a
DataError naming it, or is skipped with a warning when `[data] skip_corrupt = true`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data import register_source
from cnnlab.data.download import check_md5, download, extract, missing_error, resolve_data_dir
from cnnlab.data.images import report_skipped
from cnnlab.data.store import cached_images
from cnnlab.errors import DataError, DataMissing

DEFAULT_SIZE = 256     # image_size = 0: decode to 256x256; ImageNet backbones crop 224 from it


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str | None          # None: no official checksum known; the extracted structure is checked instead
    target: str              # the folder it unpacks to, beside the archive
    needed: tuple            # files under target that show a complete extraction


@dataclass(frozen=True)
class CubSpec:
    title: str
    root: str                # folder under the data folder that holds the archives ("": the data folder)
    archives: tuple


# The 2010 archives have no published checksums; a wrong or truncated download fails extraction or the
# structure check (every listed image must exist).
CUB2010 = CubSpec(
    "CUB-200-2010", "CUB_200_2010",
    (Archive("https://www.vision.caltech.edu/visipedia-data/CUB-200/images.tgz", None, "images", ()),
     Archive("https://www.vision.caltech.edu/visipedia-data/CUB-200/lists.tgz", None, "lists",
             ("train.txt", "test.txt", "classes.txt"))))

# Caltech DATA record 65de6-vp158 (formerly www.vision.caltech.edu/visipedia-data/CUB-200-2011/...).
CUB2011 = CubSpec(
    "CUB-200-2011", "",
    (Archive("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
             "97eceeb196236b17998738112f37df78", "CUB_200_2011",
             ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")),))


def _filename(url: str) -> str:
    return url.rsplit("/", 1)[1]


def locate(spec: CubSpec, cfg: DataConfig, quiet: bool = False) -> Path:
    """The folder holding the archives' contents, extracting / downloading what is missing."""
    data = resolve_data_dir(cfg.data_dir)
    base = data / spec.root if spec.root else data
    todo = [a for a in spec.archives
            if not ((base / a.target).is_dir() and all((base / a.target / f).is_file() for f in a.needed))]
    absent = [a for a in todo if not (base / _filename(a.url)).is_file()]
    if absent and not cfg.download:
        if len(absent) == 1:
            raise missing_error(spec.title, _filename(absent[0].url), absent[0].url, base)
        raise DataMissing(f"{spec.title}: {' and '.join(_filename(a.url) for a in absent)} not found in {base} and "
                        f"downloads are off ([data] download = false). Download "
                        f"{' and '.join(a.url for a in absent)} and put them in {base}, or set download = true.")
    for a in todo:
        archive = base / _filename(a.url)
        if archive.is_file():
            check_md5(archive, a.md5, spec.title)
        else:
            download(a.url, archive, a.md5, spec.title, quiet=quiet)
        extract(archive, base / a.target, spec.title)
        lacking = [f for f in a.needed if not (base / a.target / f).is_file()]
        if lacking:
            lacking = ", ".join(f"{a.target}/{f}" for f in lacking)
            raise DataError(f"{spec.title}: {archive} lacks {lacking}; is it the official archive? "
                            f"Delete it and {base / a.target} and try again")
    return base


def _lines(path: Path, title: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{title}: {path} not found; delete the folder and let cnnlab extract the archive again")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{title}: cannot read {path} ({e})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _id_table(path: Path, title: str) -> dict[int, str]:
    """'<id> <value>' lines (the 2011 metadata files) -> {id: value}."""
    out = {}
    for n, ln in enumerate(_lines(path, title), 1):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{title}: {path} line {n} is not '<id> <value>': {ln!r}")
        out[int(parts[0])] = parts[1]
    return out


def _image_path(images: Path, rel: str, where: str, title: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
        raise DataError(f"{title}: {where} lists {rel!r}, not a path '<class>/<file>' inside {images}")
    return images.joinpath(*p.parts)


def display_names(folders: list[str]) -> list[str]:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross' (full names kept if stripping makes duplicates)."""
    short = [f.split(".", 1)[1] if "." in f and f.split(".", 1)[0].isdigit() else f for f in folders]
    return short if len(set(short)) == len(short) else list(folders)


def read_2010(folder: Path, title: str):
    """(train records, test records, class folders); records are (path, label) in list order."""
    lists, images = folder / "lists", folder / "images"
    # one class folder name a line ('001.Black_footed_Albatross'); an '<id> <name>' line is read as its name
    classes = [ln.split(maxsplit=1)[1] if len(ln.split()) > 1 and ln.split()[0].isdigit() else ln
               for ln in _lines(lists / "classes.txt", title)]
    index = {c: k for k, c in enumerate(classes)}
    splits = []
    for split in ("train", "test"):
        recs = []
        for rel in _lines(lists / f"{split}.txt", title):
            path = _image_path(images, rel, lists / f"{split}.txt", title)
            cls = PurePosixPath(rel).parts[0]
            if cls not in index:
                raise DataError(f"{title}: {lists / f'{split}.txt'} lists {rel!r}, whose class {cls!r} is not in "
                                f"{lists / 'classes.txt'}")
            recs.append((path, index[cls]))
        splits.append(recs)
    return splits[0], splits[1], classes


def read_2011(folder: Path, title: str):
    images = folder / "images"
    paths = _id_table(folder / "images.txt", title)
    labels = _id_table(folder / "image_class_labels.txt", title)
    is_train = _id_table(folder / "train_test_split.txt", title)
    class_table = _id_table(folder / "classes.txt", title)
    ids = sorted(class_table)
    index = {cid: k for k, cid in enumerate(ids)}
    train, test = [], []
    for i, rel in paths.items():
        if i not in labels or i not in is_train:
            which = "image_class_labels.txt" if i not in labels else "train_test_split.txt"
            raise DataError(f"{title}: image {i} ({rel}) of images.txt has no line in {folder / which}")
        lab = labels[i]
        if not lab.isdigit() or int(lab) not in index:
            raise DataError(f"{title}: {folder / 'image_class_labels.txt'} gives image {i} class {lab!r}, "
                            f"not one of {folder / 'classes.txt'}")
        if is_train[i] not in ("0", "1"):
            raise DataError(f"{title}: {folder / 'train_test_split.txt'} gives image {i} {is_train[i]!r}, not 0 or 1")
        rec = (_image_path(images, rel, folder / "images.txt", title), index[int(lab)])
        (train if is_train[i] == "1" else test).append(rec)
    return train, test, [class_table[c] for c in ids]


def check_present(records: list, folder: Path, title: str, skip: bool) -> list:
    """Records whose image file exists. A missing one is a DataError, or skipped with a warning when `skip`."""
    missing = [p for p, _ in records if not p.is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(folder)) for p in missing[:3])
        msg = f"{title}: {len(missing)} listed image(s) missing under {folder} (e.g. {shown})"
        if not skip:
            raise DataError(f"{msg}; the copy is incomplete: delete {folder / 'images'} and let cnnlab extract "
                            f"the archive again, or set [data] skip_corrupt = true to skip them")
        report_skipped(title, [(p, "listed but missing") for p in missing])
        records = [r for r in records if r[0].is_file()]
    return records


def build(records_train: list, records_test: list, folders: list[str], cfg: DataConfig, title: str,
          folder: Path, quiet: bool):
    names = display_names(folders)
    # Decode only what load_dataset keeps: the selected classes and the first N of each (record order).
    from cnnlab.data import first_per_class, resolve_classes
    keep = set(resolve_classes(cfg.classes, names, cfg.source))
    size = cfg.image_size or DEFAULT_SIZE
    out = []
    for split, recs, cap in (("train", records_train, cfg.max_train_per_class),
                             ("test", records_test, cfg.max_test_per_class)):
        mask = first_per_class(np.asarray([y for _, y in recs], dtype=np.int64), keep, cap)
        chosen = [r for r, m in zip(recs, mask) if m]
        if not chosen:
            raise DataError(f"{title}: no {split} images of the selected classes in {folder}")
        chosen = check_present(chosen, folder, title, cfg.skip_corrupt)
        if not chosen:
            raise DataError(f"{title}: none of the {split} images of the selected classes exist under {folder}")
        paths = [p for p, _ in chosen]
        labels = np.asarray([y for _, y in chosen], dtype=np.int64)
        x, kept = cached_images(paths, size, cfg.skip_corrupt, f"{cfg.source} {split}", quiet)
        out += [x, labels[kept]]
    return out[0], out[1], out[2], out[3], names


@register_source("cub200-2010")
def cub200_2010(cfg: DataConfig, quiet: bool = False):
    spec = CUB2010
    folder = locate(spec, cfg, quiet)
    train, test, folders = read_2010(folder, spec.title)
    return build(train, test, folders, cfg, spec.title, folder, quiet)


@register_source("cub200-2011")
def cub200_2011(cfg: DataConfig, quiet: bool = False):
    spec = CUB2011
    folder = locate(spec, cfg, quiet) / "CUB_200_2011"
    train, test, folders = read_2011(folder, spec.title)
    return build(train, test, folders, cfg, spec.title, folder, quiet)
