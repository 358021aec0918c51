"""The decoded-image cache: one raw uint8 file per (source, selection, size), opened memory-mapped.

Training never touches a JPEG: each image is decoded once (`images.read_image`: RGB, shorter side resized
to S, centre crop) into row i of one file, and every later run maps that file instead of reading it whole.
In the cache folder (`cache_dir() / "images"`), under a key made of the image list, S and the source:

    <key>.u8         the images, uint8 (N, 3, S, S), row i = the i-th path (C order, no header)
    <key>.json       shape, one fingerprint (bytes, mtime) per image, the unreadable rows; "complete" once built
    <key>.part.json  while building: the chunks already written, so a killed build continues from them
    <key>.kept.u8    only when some images are unreadable and skipped: the readable rows, in order
    <key>.lock       held while the cache is checked or built: other processes wait, then map the result

The key holds the paths but not their fingerprints: a changed image re-decodes its own row only (its
fingerprint differs on the next open), never the whole file. The build decodes in parallel on every core,
writes each chunk with pwrite (the file is never mapped for writing, so building does not grow the
process's memory), syncs it, then records it in <key>.part.json with an atomic replace.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cnnlab.data import images
from cnnlab.runtime.cache import cache_dir
from cnnlab.errors import DataError

VERSION = 2
CHUNK = 512                 # images per recorded chunk: a killed build loses at most this many per worker
TASK = 64                   # images per worker task (small tasks keep every core busy to the end)
PROCESSES_FROM = 2048       # builds this large decode in worker processes; smaller ones in threads


class MixedSizes(DataError):
    """Images kept at their own size (image_size 0) that are not all one size: the folder source resizes them."""


def cached_images(paths: list[Path], size: int, skip_corrupt: bool, what: str, quiet: bool = False):
    """The decoded images of `paths`, built or updated as needed. Returns (uint8 memmap (K, 3, S, S) of the
    readable images, kept mask over paths). The memmap is copy-on-write: writing to it never touches the cache."""
    base = cache_folder() / key(paths, size, what)
    with locked(base):        # one builder at a time (torchrun's processes, runs sharing the cache folder)
        prints = fingerprints(paths)
        meta = _read_json(_json(base))
        if not (meta and meta.get("complete") and _file_ok(base, meta)):
            meta = build(base, paths, size, what, prints, quiet)
        stale = [i for i, (old, new) in enumerate(zip(meta["files"], prints)) if old != new]
        if stale:                                   # changed since decoded: those rows only
            meta = refresh(base, meta, paths, size, stale, prints, quiet)
        return readable(base, meta, paths, skip_corrupt, what)


def cache_folder() -> Path:
    return cache_dir() / "images"


def key(paths: list[Path], size: int, what: str) -> str:
    h = hashlib.sha256(f"v{VERSION}|{what}|{size}\n".encode())
    for p in paths:
        h.update(f"{p}\n".encode())
    return h.hexdigest()[:20]


def fingerprints(paths: list[Path]) -> list[list[int]]:
    """(bytes, mtime_ns) of each file; [-1, -1] for a missing one (it becomes an unreadable row)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([-1, -1])
    return out


# ---------------------------------------------------------------- building

def build(base: Path, paths: list[Path], size: int, what: str, prints: list, quiet: bool) -> dict:
    """Decode every image into <key>.u8, continuing a killed build when its record matches."""
    meta, part = _read_json(_json(base)), _read_json(_part(base))
    if meta and part and not meta.get("complete") and len(meta["files"]) == len(paths) and _file_ok(base, meta):
        done, bad = set(part["done"]), part["bad"]
    else:
        shape = [len(paths), *probe_shape(paths, size, what)]
        meta = {"version": VERSION, "what": what, "size": size, "shape": shape, "files": prints, "complete": False}
        _data(base).parent.mkdir(parents=True, exist_ok=True)
        with open(_data(base), "wb") as f:      # preallocated (sparse): rows are written in any order
            f.truncate(int(np.prod(shape)))
        _write_json(_json(base), meta)
        done, bad = set(), {}
        _write_json(_part(base), {"done": [], "bad": bad})
    n = len(paths)
    todo = [c for c in range((n + CHUNK - 1) // CHUNK) if c not in done]
    rows_done = n - sum(min(CHUNK, n - c * CHUNK) for c in todo)
    with tqdm(total=n, initial=rows_done, unit="img", desc=f"decode {what}", disable=quiet,
              dynamic_ncols=True, smoothing=0.1) as bar:
        def chunk_done(c: int, chunk_bad: dict) -> None:
            done.add(c)
            bad.update(chunk_bad)
            _write_json(_part(base), {"done": sorted(done), "bad": bad})     # after the rows are synced
        decode_rows(base, meta["shape"], paths, size, [range(c * CHUNK, min(n, (c + 1) * CHUNK)) for c in todo],
                    todo, chunk_done, bar)
    meta.update(bad=bad, complete=True)
    _write_json(_json(base), meta)
    _part(base).unlink(missing_ok=True)
    return meta


def refresh(base: Path, meta: dict, paths: list[Path], size: int, rows: list[int], prints: list, quiet: bool) -> dict:
    """Re-decode the rows whose files changed; their fingerprints are recorded only once they are written."""
    redo = {str(r) for r in rows}
    bad = {r: e for r, e in meta["bad"].items() if r not in redo}
    with tqdm(total=len(rows), unit="img", desc=f"update {meta['what']}", disable=quiet or len(rows) < 100) as bar:
        chunks = [rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK)]
        decode_rows(base, meta["shape"], paths, size, chunks, range(len(chunks)),
                    lambda c, chunk_bad: bad.update(chunk_bad), bar)
    for r in rows:
        meta["files"][r] = prints[r]
    meta["bad"] = bad
    _kept(base).unlink(missing_ok=True)          # made again from the new rows when needed
    meta.pop("kept", None)
    _write_json(_json(base), meta)
    return meta


def decode_rows(base: Path, shape: list, paths: list[Path], size: int, chunks: list, ids, on_chunk, bar) -> None:
    """Decode the rows of each chunk into the file, in parallel; `on_chunk(id, bad rows)` once a chunk is synced.

    Small images decode in tens of microseconds, about the cost of the Python around them, so threads
    would wait on the interpreter lock: large builds use one process per core (forked: nothing to import).
    Tasks stay a few chunks ahead of the writes, so memory does not grow with the size of the build."""
    n_rows = sum(len(c) for c in chunks)
    workers = os.cpu_count() or 1
    fork = sys.platform == "linux" and workers > 1 and n_rows >= PROCESSES_FROM
    pool: Executor
    if fork:
        import multiprocessing
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(workers)
    args = (str(_data(base)), tuple(shape), size)
    pending: dict = {}                           # future -> chunk id
    left: dict = {}                              # chunk id -> tasks not yet finished
    found: dict = {}                             # chunk id -> bad rows found so far
    fd = os.open(_data(base), os.O_RDONLY)
    try:
        queue = [(c, list(rows[i:i + TASK])) for c, rows in zip(ids, chunks) for i in range(0, len(rows), TASK)]
        for c, rows in zip(ids, chunks):
            left[c], found[c] = (len(rows) + TASK - 1) // TASK, {}
        queue.reverse()
        while queue or pending:
            while queue and len(pending) < 4 * workers:
                c, rows = queue.pop()
                pending[pool.submit(write_rows, *args, rows, [str(paths[r]) for r in rows])] = c
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                c = pending.pop(fut)
                task_bad, n = fut.result()
                found[c].update(task_bad)
                bar.update(n)
                left[c] -= 1
                if left[c] == 0:
                    os.fdatasync(fd)                 # the chunk's rows are on disk before the record says so
                    on_chunk(c, found.pop(c))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)


def write_rows(file: str, shape: tuple, size: int, rows: list[int], paths: list[str]) -> tuple[dict, int]:
    """Worker task: decode `paths` into `rows` of the file. Returns ({row: reason} of unreadable ones, count).
    Consecutive rows go to the file in one write (a small write costs as much as a small JPEG's decode)."""
    buf = np.zeros((len(rows), *shape[1:]), dtype=np.uint8)
    bad = {}
    for j, p in enumerate(paths):
        # size 0: an image of another size is refused from its header, before its pixels are decoded
        arr = None if size else images.wrong_size(Path(p), tuple(shape[1:]))
        if arr is None:
            arr = images.read_image(Path(p), size)
        if isinstance(arr, Exception):
            bad[str(rows[j])] = f"{type(arr).__name__}: {arr}"
        elif arr.shape != tuple(shape[1:]):
            bad[str(rows[j])] = (f"size {arr.shape[2]}x{arr.shape[1]} differs from the first image's "
                                 f"{shape[3]}x{shape[2]}; set [data] image_size to resize them to one size")
        else:
            buf[j] = arr
    fd = os.open(file, os.O_WRONLY)
    try:
        starts = [0] + [j for j in range(1, len(rows)) if rows[j] != rows[j - 1] + 1] + [len(rows)]
        for a, b in zip(starts, starts[1:]):
            os.pwrite(fd, buf[a:b], rows[a] * buf[0].nbytes)
    finally:
        os.close(fd)
    return bad, len(rows)


def probe_shape(paths: list[Path], size: int, what: str) -> tuple:
    """(3, S, S); with size 0 (images kept as they are), the size of the first readable image."""
    if size:
        return (3, size, size)
    for p in paths:
        arr = images.read_image(p, size)
        if not isinstance(arr, Exception):
            return arr.shape
    raise DataError(f"{what}: no readable images")


# ---------------------------------------------------------------- reading

def readable(base: Path, meta: dict, paths: list[Path], skip_corrupt: bool, what: str):
    """(memmap of the readable rows, kept mask); unreadable images are an error unless skip_corrupt."""
    n = len(paths)
    bad = {int(r): e for r, e in meta["bad"].items()}
    keep = np.ones(n, dtype=bool)
    keep[list(bad)] = False
    mixed = [r for r, e in bad.items() if "image_size" in e]
    if mixed:
        raise MixedSizes(f"{what}: images have different sizes ({paths[mixed[0]]}: {bad[mixed[0]]})")
    if bad and not skip_corrupt:
        r = min(bad)
        raise DataError(f"{what}: cannot read image {paths[r]} ({bad[r]}); remove or replace it, "
                        f"or set [data] skip_corrupt = true to skip unreadable images")
    images.report_skipped(what, [(paths[r], bad[r]) for r in sorted(bad)])
    if not keep.any():
        raise DataError(f"{what}: no readable images")
    shape = meta["shape"]
    if not bad:
        return np.memmap(_data(base), dtype=np.uint8, mode="c", shape=tuple(shape)), keep
    kept_shape = (int(keep.sum()), *shape[1:])
    if meta.get("kept") != sorted(bad) or not _kept(base).is_file():
        copy_rows(_data(base), _kept(base), np.flatnonzero(keep), int(np.prod(shape[1:])))
        meta["kept"] = sorted(bad)
        _write_json(_json(base), meta)
    return np.memmap(_kept(base), dtype=np.uint8, mode="c", shape=kept_shape), keep


def copy_rows(src: Path, dst: Path, rows: np.ndarray, row_bytes: int) -> None:
    """Copy the listed rows of `src` into a new file, in order, a chunk at a time (atomic: tmp + replace)."""
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb", buffering=0) as f, open(tmp, "wb") as g:
        for i in range(0, len(rows), CHUNK):
            for r in rows[i:i + CHUNK]:
                g.write(os.pread(f.fileno(), row_bytes, int(r) * row_bytes))
        g.flush()
        os.fsync(g.fileno())
    os.replace(tmp, dst)


# ---------------------------------------------------------------- the files

@contextmanager
def locked(base: Path):
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_name(base.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _data(base: Path) -> Path:
    return base.with_name(base.name + ".u8")


def _json(base: Path) -> Path:
    return base.with_name(base.name + ".json")


def _part(base: Path) -> Path:
    return base.with_name(base.name + ".part.json")


def _kept(base: Path) -> Path:
    return base.with_name(base.name + ".kept.u8")


def _file_ok(base: Path, meta: dict) -> bool:
    try:
        return meta.get("version") == VERSION and os.path.getsize(_data(base)) == int(np.prod(meta["shape"]))
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    from cnnlab.records.io import atomic_write     # local import: runs imports nothing from data
    with atomic_write(path) as f:
        f.write(json.dumps(obj, separators=(",", ":")))     # dumps: the C encoder (dump streams in Python)
