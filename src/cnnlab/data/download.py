"""Fetching and unpacking official archives: checksums, safe extraction, clear offline errors.

Nothing is ever half-written: downloads go to `<file>.part` and are renamed when complete and verified;
archives are extracted into a temporary folder beside the target and renamed into place at the end.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from cnnlab.errors import DataError, DataMissing

MIRROR_ENV = "CNNLAB_DOWNLOAD_MIRROR"   # base URL that replaces the official host (e.g. a lab mirror)


def default_data_dir() -> Path:
    """--data-dir / config win; then $CNNLAB_DATA; then the user cache folder."""
    if os.environ.get("CNNLAB_DATA"):
        return Path(os.environ["CNNLAB_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnlab" / "data"


def resolve_data_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else default_data_dir()


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_url(url: str) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[1]}" if mirror else url


def download(url: str, dest: Path, md5: str | None, what: str, quiet: bool = False) -> Path:
    """Download url to dest, verifying md5. Offline or failed: DataError naming the file, URL and folder."""
    url = resolve_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=quiet) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataMissing(f"{what}: {dest.name} is not in {dest.parent} and could not be downloaded from {url} "
                        f"({reason}). Download it by hand and put it in {dest.parent} "
                        f"(or point --data-dir / $CNNLAB_DATA at the folder that holds it).") from None
    if md5 and h.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"{what}: download of {url} is corrupt (md5 {h.hexdigest()}, expected {md5}); "
                        f"nothing was kept, try again")
    os.replace(part, dest)
    return dest


def missing_error(what: str, filename: str, url: str, folder: Path) -> DataMissing:
    return DataMissing(f"{what}: {filename} not found in {folder} and downloads are off ([data] download = false). "
                     f"Download {url} and put it in {folder}, or set download = true.")


def check_md5(path: Path, md5: str | None, what: str) -> bool:
    """True when path matches md5; warns (does not fail) on a mismatch: local copies may be re-encoded."""
    if not md5:
        return True
    got = md5sum(path)
    if got != md5:
        warnings.warn(f"{what}: {path} has md5 {got}, not the official {md5}; reading it anyway "
                      f"(a re-encoded or locally made copy)", stacklevel=2)
        return False
    return True


def _refuse_absolute(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's 'data' filter, except that absolute member names are refused instead of made relative."""
    if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def extract(archive: Path, target: Path, what: str) -> Path:
    """Extract archive so that its contents land in `target`'s parent, atomically and safely.

    Members that would land outside the folder (absolute paths, '..', links pointing out) are refused by
    tarfile's 'data' filter (PEP 706); zip members are checked the same way. A corrupt or truncated archive
    raises DataError and leaves nothing behind.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    dest = (tmp / name).resolve()
                    if not dest.is_relative_to(tmp.resolve()):
                        raise DataError(f"{what}: {archive} holds member {name!r} that would be written outside "
                                        f"{parent}; refusing to extract it")
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter=_refuse_absolute)
        produced = tmp / target.name
        if not produced.exists():
            raise DataError(f"{what}: {archive} does not contain {target.name}/; is it the right file?")
        if target.exists():
            shutil.rmtree(target)
        os.replace(produced, target)
    except tarfile.FilterError as e:
        raise DataError(f"{what}: {archive} holds member {getattr(e, 'tarinfo', None) and e.tarinfo.name!r} "
                        f"that would be written outside {parent} ({e}); refusing to extract it") from None
    except (tarfile.ReadError, EOFError, zlib.error, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{what}: {archive} is corrupt or truncated ({e}); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
