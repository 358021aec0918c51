"""Splits that do not fit the memory budget: read in batches from host storage, ahead of use.

A split whose uint8 images fit `[data] memory_budget_mb` lives on the device as one tensor (`Batches`);
each step indexes it. One that does not (`Streamed`) stays in its file (the memory-mapped decoded-image
cache, or a feature cache) or, for sources read into RAM (CIFAR), in host memory: for each batch a
background thread gathers the rows (in file order, for locality), pins them and copies them to the
device, two batches ahead. Both yield the same uint8 batch for the same indices, so the shuffling, the
augmentation and every random stream are those of the in-memory path: a streamed run is the in-memory
run, bit for bit.

Under torchrun each process asks only for its shard of every global batch, so a streamed split costs each
process its shard's rows, not the whole data set. Files are read with pread, never mapped, so streaming
does not grow the process's resident memory: the kernel's page cache holds what fits.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cnnlab.errors import DataError

IOV_MAX = 1024                # buffers per preadv call (Linux's limit)


class RowFile:
    """Rows of an (N, ...) array stored in a file at `offset` (C order): the decoded-image cache (.u8) or a
    feature cache (.npy)."""

    def __init__(self, path, offset: int, dtype, shape: tuple):
        self.path, self.offset = str(path), int(offset)
        self.dtype, self.shape = np.dtype(dtype), tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def of(cls, mm: np.memmap) -> "RowFile":
        return cls(mm.filename, mm.offset, mm.dtype, mm.shape)

    def fingerprint(self) -> str:
        """Identifies the content without reading it: the file, its size and modification time."""
        st = os.stat(self.path)
        return f"{self.path}|{self.offset}|{self.shape}|{st.st_size}|{st.st_mtime_ns}"

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out[j] = row rows[j]. Reads go in ascending row order, a run of consecutive rows in one preadv
        that scatters them to their places in `out`."""
        rb, fd, n = self.row_bytes, self._fd, len(rows)
        dest = memoryview(out.reshape(n, -1).view(np.uint8)).cast("B") if n else None
        rows = rows.tolist()                            # Python ints: this loop runs once per row
        order = sorted(range(n), key=rows.__getitem__)
        i = 0
        while i < n:
            j = i + 1
            while j < n and j - i < IOV_MAX and rows[order[j]] == rows[order[j - 1]] + 1:
                j += 1
            _preadv_all(fd, [dest[k * rb:(k + 1) * rb] for k in order[i:j]], self.offset + rows[order[i]] * rb)
            i = j

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _preadv_all(fd: int, bufs: list, offset: int) -> None:
    want = sum(len(b) for b in bufs)
    got = os.preadv(fd, bufs, offset)
    if got != want:                  # only at the end of a regular file: a truncated cache
        raise DataError(f"cache file ends early: wanted {want} bytes at offset {offset}, got {got}; delete the "
                        f"file and its .json to rebuild it")


class Rows:
    """Rows `index` (positions in the source; None: all) of a source: a RowFile, or a host tensor for data
    read into RAM. Nothing is read until a batch is gathered."""

    def __init__(self, source: RowFile | torch.Tensor, index: np.ndarray | None = None, pin: bool = False):
        self.source, self.pin = source, pin
        self.whole = index is None
        self.index = np.arange(source.shape[0]) if index is None else np.asarray(index, dtype=np.int64)
        np_dtype = source.dtype if isinstance(source, RowFile) else torch.empty(0, dtype=source.dtype).numpy().dtype
        self.dtype = torch.from_numpy(np.empty(0, np_dtype)).dtype
        self.row_bytes = int(np.prod(source.shape[1:])) * np_dtype.itemsize

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.source.shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.index) * self.row_bytes

    def gather(self, pos: np.ndarray) -> torch.Tensor:
        """Host tensor of the rows at positions `pos` of this split, in that order (pinned when `pin`)."""
        rows = self.index[pos]
        out = torch.empty((len(rows), *self.source.shape[1:]), dtype=self.dtype, pin_memory=self.pin)
        if isinstance(self.source, RowFile):
            self.source.read(rows, out.numpy())
        else:
            np.take(self.source.numpy(), rows, axis=0, out=out.numpy())
        return out

    def __getitem__(self, i: slice) -> torch.Tensor:
        if not isinstance(i, slice):
            raise TypeError("Rows are read by slice, or by positions with gather()")
        return self.gather(np.arange(len(self.index))[i])


def rows_of(x: torch.Tensor, file: RowFile | None, index: torch.Tensor | None = None) -> Rows:
    """The rows `index` of a data set's images or features (all when None), from their file when they have one."""
    return Rows(file if file is not None else x, None if index is None else index.numpy())


def prefetch(fn: Callable, items: Iterable, ahead: int = 2) -> Iterator:
    """fn(item) for each item in order, computed on a background thread up to `ahead` items ahead."""
    items = list(items)
    q: queue.Queue = queue.Queue(maxsize=max(1, ahead - 1))     # one waiting + one in the making
    stop = threading.Event()

    def put(msg) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for it in items:
                if stop.is_set() or not put((True, fn(it))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))

    t = threading.Thread(target=work, daemon=True, name="cnnlab-prefetch")
    t.start()
    try:
        for _ in items:
            ok, value = q.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        t.join()


@dataclass
class Batches:
    """A split on the device: uint8 images (or float features) and labels, indexed per batch."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: torch.Tensor | None, slices: list[slice]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of order[s] for each slice s (order None: the positions in s themselves)."""
        if order is None:
            for s in slices:
                yield self.x[s], self.y[s]
            return
        o = order.to(self.y.device)                 # once per epoch; each step indexes on the device
        for s in slices:
            idx = o[s]
            yield self.x[idx], self.y[idx]


class Streamed:
    """A split read from host storage batch by batch (see the module doc). Labels stay on the device."""

    def __init__(self, x: Rows, y: torch.Tensor, device: torch.device):
        self.x, self.y, self.device = x, y, device
        self.cuda = device.type == "cuda"
        self.x.pin = self.cuda
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, order: torch.Tensor | None, slices: list[slice]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As Batches.batches, the images read by a background thread two batches ahead."""
        pos = np.arange(len(self.x)) if order is None else order.numpy()
        o = None if order is None else order.to(self.y.device)
        for s, (xb, ready) in zip(slices, prefetch(lambda s: self._load(pos[s]), slices)):
            if ready is not None:          # the copy ran on the side stream: wait for it there, not here
                main = torch.cuda.current_stream(self.device)
                main.wait_event(ready)
                xb.record_stream(main)
            yield xb, (self.y[s] if o is None else self.y[o[s]])

    def _load(self, pos: np.ndarray):
        host = self.x.gather(pos)
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self._copy_stream):
            xb = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return xb, ready


# ---------------------------------------------------------------- what goes where

def memory_budget(budget_mb: int, device: torch.device) -> int:
    """Bytes the splits may take on the device: [data] memory_budget_mb, else half of what is free (host
    memory on a CPU, device memory on a GPU), shared by the processes torchrun starts on this machine."""
    if budget_mb:
        return budget_mb * 2 ** 20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available_ram() // 2 // max(1, local)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2 ** 30


def place(splits: dict[str, tuple[Rows, torch.Tensor]], device: torch.device, budget: int,
          say: Callable[[str], None] | None = print) -> dict:
    """Each split on the device while the budget lasts (in the order given: train first), else streamed.
    Says in one line which splits are streamed and why."""
    out, left, streamed, kept = {}, budget, [], []
    for name, (rows, y) in splits.items():
        size = rows.nbytes
        if size <= left:
            out[name] = Batches(load(rows, device), y.to(device))
            left -= size
            kept.append(f"{name} {mb(size)}")
        else:
            out[name] = Streamed(rows, y.to(device), device)
            streamed.append(f"{name} ({mb(size)})")
    if streamed and say:
        say(f"data: streaming {', '.join(streamed)} from host storage, batch by batch: over the memory budget "
            f"of {mb(budget)} ([data] memory_budget_mb){'; on the device: ' + ', '.join(kept) if kept else ''}")
    return out


def load(rows: Rows, device: torch.device, chunk_bytes: int = 64 * 2 ** 20) -> torch.Tensor:
    """A whole split onto the device (read from its file in chunks, so no second host copy is made)."""
    if isinstance(rows.source, torch.Tensor):
        x = rows.source if rows.whole else rows.source[torch.from_numpy(rows.index)]
        return x.to(device)
    out = torch.empty(rows.shape, dtype=rows.dtype, device=device)
    step = max(1, chunk_bytes // rows.row_bytes)
    for i in range(0, len(rows), step):
        out[i:i + step].copy_(rows.gather(np.arange(i, min(i + step, len(rows)))))
    return out


def mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"
