"""CIFAR-10 and CIFAR-100 in the official python layout (`cifar-*-python.tar.gz` or its folder)."""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig
from cnnlab.data import register_source
from cnnlab.data.download import check_md5, download, extract, md5sum, missing_error, resolve_data_dir
from cnnlab.errors import DataError


@dataclass(frozen=True)
class CifarSpec:
    title: str
    url: str
    md5: str
    folder: str
    train: dict          # file -> md5
    test: dict
    meta: tuple          # (file, md5, key of class names)
    label_key: str


CIFAR10 = CifarSpec(
    "CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py",
    {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
     "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
     "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"},
    {"test_batch": "40351d587109b95175f43aff81a1287e"},
    ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", "label_names"), "labels")

CIFAR100 = CifarSpec(
    "CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python",
    {"train": "16019d7e3df5f24257cddd939b257f8d"}, {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    ("meta", "7973b15100ade9c7d40fb424638fde48", "fine_label_names"), "fine_labels")


class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles; allow only what they contain (numpy arrays), never arbitrary code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
               # pickle protocol 5 (pickle.HIGHEST_PROTOCOL) stores arrays as _frombuffer(bytes, dtype, shape)
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, title: str) -> dict:
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any failure here means a bad file
        raise DataError(f"{title}: cannot read {path} ({type(e).__name__}: {e}); "
                        f"delete the folder and let cnnlab extract the archive again") from None


def locate(spec: CifarSpec, cfg: DataConfig, quiet: bool = False) -> Path:
    """The extracted folder, extracting or downloading the official archive when needed."""
    root = resolve_data_dir(cfg.data_dir)
    folder = root / spec.folder
    needed = [*spec.train, *spec.test, spec.meta[0]]
    if folder.is_dir() and all((folder / f).is_file() for f in needed):
        return folder
    archive = root / spec.url.rsplit("/", 1)[1]
    if not archive.is_file():
        if not cfg.download:
            raise missing_error(spec.title, archive.name, spec.url, root)
        download(spec.url, archive, spec.md5, spec.title, quiet=quiet)
    else:
        check_md5(archive, spec.md5, spec.title)
    extract(archive, folder, spec.title)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{spec.title}: {archive} lacks {', '.join(missing)}; is it the official archive?")
    return folder


# The files whose md5 sums this process has checked, by path, size and mtime: a suite, seeds or --folds read one
# folder many times, and that is one check and one warning (a file rewritten since is checked again).
_CHECKED: set[tuple] = set()


def read(spec: CifarSpec, folder: Path):
    files = {**spec.train, **spec.test, spec.meta[0]: spec.meta[1]}
    stats = {f: (folder / f).stat() for f in files}
    stamp = tuple((str((folder / f).resolve()), st.st_size, st.st_mtime_ns) for f, st in stats.items())
    mismatched = [] if stamp in _CHECKED else [f for f, md5 in files.items() if md5sum(folder / f) != md5]
    _CHECKED.add(stamp)
    if mismatched:
        warnings.warn(f"{spec.title}: {', '.join(mismatched)} in {folder} differ from the official files "
                      f"(md5); reading them anyway (a re-encoded or locally made copy)", stacklevel=2)

    def load(names):
        xs, ys = [], []
        for name in names:
            d = _unpickle(folder / name, spec.title)
            if "data" not in d or spec.label_key not in d:
                raise DataError(f"{spec.title}: {folder / name} lacks 'data' or '{spec.label_key}'")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(d[spec.label_key])
        return np.concatenate(xs), np.asarray(ys, dtype=np.int64)

    xtr, ytr = load(spec.train)
    xte, yte = load(spec.test)
    meta = _unpickle(folder / spec.meta[0], spec.title)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.meta[2]]]
    return xtr, ytr, xte, yte, names


@register_source("cifar100")
def cifar100(cfg: DataConfig, quiet: bool = False):
    return read(CIFAR100, locate(CIFAR100, cfg, quiet))


@register_source("cifar10")
def cifar10(cfg: DataConfig, quiet: bool = False):
    return read(CIFAR10, locate(CIFAR10, cfg, quiet))
