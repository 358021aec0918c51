"""CPU training threads: never more compute threads than there are free cores.

Why. PyTorch runs each CPU op (a oneDNN convolution, a matmul, an elementwise op over a large tensor)
on an OpenMP pool: the op is cut into one fixed piece per thread, and it ends at a barrier where every
thread waits for the slowest piece. When another process keeps a core busy, one of our threads has to
share that core with it; the scheduler gives it the core only part of the time, in slices of
milliseconds, and every op waits at its barrier for that thread to be scheduled again. A training step
of the small CIFAR nets is hundreds of ops of tens of microseconds each, so it slows down far more than
by the core it lost (libgomp's default wait policy, spinning at the barrier, makes it worse: the
spinning thread uses up the time slices the descheduled one needs). On a 2-core machine with one busy
process beside it, BaseNet training fell ~5x, while Keras, whose Eigen pool cuts work into many small
shards taken by whichever thread is running, lost half. One thread on the free core loses nothing to
barriers (see benchmarks/README.md for the measurements).

What. `configure(model, device)` at the start of `fit` estimates how many cores other processes keep
busy (the machine's busy time in /proc/stat minus ours, over 80 ms) and sets torch's thread
count to the free cores: at least 1, at most the count the process had (torch's default, the user's
`torch.set_num_threads`, or the per-rank share under torchrun). `on_epoch_end(model, seconds)` measures
the other processes' CPU use over the epoch just run (busy time in /proc/stat minus this process's own
CPU time) and sets the count for the next epoch; `on_step()`, called by the training loop after every step
(a clock read), does the same every CHECK_EVERY_S seconds, so a load that comes or goes in the middle of a
long epoch is followed within seconds. Only CPU training is touched; `OMP_NUM_THREADS` in the environment pins the
count (nothing here changes it). On an idle machine nothing changes at all. `epoch_threads()` gives the
counts an epoch ran with, which fit records in each epoch of history.json ("threads": 2, or [2, 1] when the
count changed during the epoch).

Pinned. `[train] threads = N` sets N threads for the whole run (on any device, OMP_NUM_THREADS or not),
and `[train] deterministic = true` (`--deterministic`) fixes the count the process starts with (at most the
CPU capacity) and turns on torch.use_deterministic_algorithms(warn_only=True); either way nothing follows
the load: a run on a busy machine is slower, and gives the numbers it gives on an idle one.

Numerics. The thread count changes only the order of float summations (oneDNN splits the batch among
threads in the weight-gradient reductions): a run is bitwise identical to another at the same load,
and within float rounding of it (accuracy within seed noise) when the load differed. Pin the count
(above, or OMP_NUM_THREADS) for bitwise comparisons on a machine whose load varies.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

SLACK = 0.3          # foreign load (cores) tolerated before giving up a thread: daemons, short bursts
MIN_WINDOW_S = 0.25  # shortest measuring window a decision is made on (shorter: keep measuring)
CHECK_EVERY_S = 2.0  # on_step re-measures after this many seconds
MAX_LOG = 100        # decisions kept for summary()
PROBE_S = 0.08       # configure's first measurement (asleep): 16 ticks of 2 CPUs at Linux's 100 Hz


# ---------------------------------------------------------------- what the machine offers

def cpu_capacity() -> float:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup CPU quota (containers)."""
    try:
        n = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = float(os.cpu_count() or 1)
    quota = cgroup_quota()
    return max(1.0, min(n, quota)) if quota else n


def cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, or v1 cfs quota/period); None when unlimited or unknown."""
    try:
        return parse_cpu_max(open("/sys/fs/cgroup/cpu.max").read())
    except OSError:
        pass
    try:
        q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        p = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def parse_cpu_max(text: str) -> float | None:
    """'200000 100000' -> 2.0; 'max 100000' -> None."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        q, p = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def choose(base: int, capacity: float, foreign: float) -> int:
    """Threads to run: the free cores (capacity - foreign load, rounded down after SLACK), in [1, base].
    Rounding down on purpose: a thread too few costs its share, a thread too many stalls every op."""
    free = capacity - max(0.0, foreign)
    return max(1, min(base, math.floor(free + SLACK)))


# ---------------------------------------------------------------- measuring the other processes

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_busy_seconds(stat_text: str, cpus: set[int] | None = None, niced: bool = True) -> float:
    """Busy CPU seconds in /proc/stat text: user+system+irq+softirq+steal (guest is inside user), and
    nice (user time of processes at nice > 0) when `niced`; over the per-CPU lines of `cpus`, or the
    aggregate 'cpu' line when cpus is None."""
    total = 0
    for line in stat_text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *vals = line.split()
        if cpus is None:
            if name != "cpu":
                continue
        elif name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in vals[:8]] + [0] * (8 - len(vals[:8]))
        total += v[0] + v[2] + v[5] + v[6] + v[7] + (v[1] if niced else 0)
    return total / _CLK_TCK


@dataclass(frozen=True)
class Snapshot:
    wall: float        # perf_counter seconds
    busy: float        # busy CPU seconds of the machine (our CPUs)
    own: float         # CPU seconds used by this process, all its threads


def snapshot() -> Snapshot:
    """Now: the clock, the busy time of our CPUs, our own CPU time. Processes at nice > 0 are left out of
    the busy time unless this one is niced too: they yield to us (a nice-19 background job takes ~1.5%
    of a core from a thread of ours), so they do not stall our threads."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    busy = parse_busy_seconds(open("/proc/stat").read(), cpus, niced=os.getpriority(os.PRIO_PROCESS, 0) > 0)
    return Snapshot(time.perf_counter(), busy, time.process_time())


def foreign_cores(a: Snapshot, b: Snapshot) -> float:
    """Cores kept busy by other processes between two snapshots (their CPU seconds / wall seconds)."""
    dt = b.wall - a.wall
    if dt <= 0:
        return 0.0
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / dt)


# ---------------------------------------------------------------- the state of this process

@dataclass
class _State:
    active: bool = False                  # configured for CPU training and not pinned
    base: int | None = None               # the most threads to use
    applied: int | None = None            # the count this module set last
    capacity: float = 1.0
    mark: Snapshot | None = None          # start of the current measuring window
    epochs: int = 0                       # on_epoch_end calls since configure
    next_check: float = math.inf          # perf_counter time of on_step's next measurement
    log: list[dict] = field(default_factory=list)   # every decision: {"threads", "foreign", "at"}
    pinned: int | None = None             # the count a run pinned ([train] threads / deterministic)
    deterministic: bool = False           # torch's deterministic algorithms turned on here (to turn off)
    used: list[int] = field(default_factory=list)   # the counts in effect since the epoch began


_state = _State()


def _pinned() -> bool:
    return bool(os.environ.get("OMP_NUM_THREADS", "").strip())


def _apply(n: int, foreign: float | None, at: str) -> int:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _state.applied = n
    if not _state.used or _state.used[-1] != n:
        _state.used.append(n)
    _state.log.append({"threads": n, "foreign": None if foreign is None else round(foreign, 2), "at": at})
    del _state.log[1:-MAX_LOG]            # the first decision and the latest ones
    return n


def configure(model=None, device=None, pin: int = 0, deterministic: bool = False) -> int:
    """Call at the start of fit (and of any long CPU loop): sets torch's threads to the free cores, or
    to `pin` ([train] threads) for the whole run; `deterministic`: a fixed count (`pin`, else the process's
    own, at most the CPU capacity) and torch's deterministic algorithms. Returns the thread count in effect.
    (model is not used: the engine's call passes it.)"""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    from cnnlab.runtime import distributed
    deterministic_algorithms(deterministic)
    cur = torch.get_num_threads()
    if _state.applied is None or cur != _state.applied:
        _state.base = cur             # torch's default or the user's own set_num_threads
    _state.used, _state.epochs = [], 0
    _state.pinned = pin or (max(1, min(_state.base, math.floor(cpu_capacity()))) if deterministic else None)
    if _state.pinned:
        _state.active = False         # fixed for the run: the same numbers at any load
        return _apply(_state.pinned, None, "start, pinned")
    if dev.type != "cpu" or _pinned() or distributed.info().enabled:
        _state.active, _state.used = False, [cur]   # GPU: the CPU threads hardly matter; torchrun: the ranks share the cores
        return cur
    _state.active = True
    _state.capacity = cpu_capacity()
    try:
        a = snapshot()
        time.sleep(PROBE_S)
        _state.mark = snapshot()
        foreign = foreign_cores(a, _state.mark)
        _state.next_check = time.perf_counter() + CHECK_EVERY_S
    except (OSError, ValueError):     # no /proc (not Linux): leave torch's choice alone
        _state.active, _state.used = False, [cur]
        return cur
    return _apply(choose(_state.base, _state.capacity, foreign), foreign, "start")


def on_epoch_end(model=None, seconds: float | None = None) -> int:
    """Call after each epoch (validation included; after epoch_threads()): re-measures the load over the
    epoch and sets the thread count for the next one. Returns the thread count in effect."""
    _state.used = [torch.get_num_threads()]
    if not _state.active:
        return torch.get_num_threads()
    _state.epochs += 1
    n = _decide(f"epoch {_state.epochs}")
    _state.used = [n]                 # the next epoch starts at the count decided now
    return n


def epoch_threads() -> int | list[int]:
    """The thread count the epoch ran with (since configure or the last on_epoch_end), or the counts in
    order when it changed during the epoch: what history.json records per epoch."""
    used = list(_state.used)
    if not used or used[-1] != torch.get_num_threads():   # changed by someone else
        used.append(torch.get_num_threads())
    return used[0] if len(used) == 1 else used


def deterministic_algorithms(on: bool) -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True) for a deterministic run: on CUDA, deterministic
    cuDNN convolutions and cuBLAS (CUBLAS_WORKSPACE_CONFIG set when unset; it counts only before the first
    cuBLAS call of the process), and a warning from each op that has no deterministic kernel. Turned off
    again for a later run that does not ask for it, unless the user had turned it on."""
    if on and not torch.are_deterministic_algorithms_enabled():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        _state.deterministic = True
    elif not on and _state.deterministic:
        torch.use_deterministic_algorithms(False)
        _state.deterministic = False


def on_step() -> int | None:
    """Call after each training step (cheap: a clock read); every CHECK_EVERY_S it re-measures the load
    over the last window and sets the thread count, so a load that starts in the middle of a long epoch
    costs seconds, not the rest of the epoch. Returns the count when it decided, else None."""
    if not _state.active or time.perf_counter() < _state.next_check:
        return None
    return _decide(f"epoch {_state.epochs + 1}, step")


def _decide(at: str) -> int:
    if torch.get_num_threads() != _state.applied:     # changed by someone else since: theirs to decide
        _state.active = False
        return torch.get_num_threads()
    try:
        now = snapshot()
    except (OSError, ValueError):
        return torch.get_num_threads()
    if _state.mark is None or now.wall - _state.mark.wall < MIN_WINDOW_S:   # too short to tell: keep measuring
        return torch.get_num_threads()
    foreign = foreign_cores(_state.mark, now)
    _state.mark, _state.next_check = now, time.perf_counter() + CHECK_EVERY_S
    n = choose(_state.base, _state.capacity, foreign)
    return _apply(n, foreign, at) if n != _state.applied else n


def summary() -> dict:
    """The decisions of this process so far, for run records: base count, capacity, and each change."""
    return {"base": _state.base, "capacity": _state.capacity, "active": _state.active, "pinned": _state.pinned,
            "threads": torch.get_num_threads(), "changes": list(_state.log)}


def reset() -> None:
    """Forget the state (tests; a new independent run in the same process)."""
    global _state
    if _state.applied is not None and _state.base is not None and torch.get_num_threads() == _state.applied:
        torch.set_num_threads(_state.base)
    deterministic_algorithms(False)
    _state = _State()
