"""Suites: a folder of configs run in order into one folder, then one report.

<suite folder>/suite.json records what was asked (suite, overrides, data preset, rows, seeds) and the
comparisons to test; rows run into <suite folder>/rows/<NN>-<name>[-seed<S>]/. So a killed suite
resumes (`cnnlab suite --resume FOLDER`: finished rows are skipped, an interrupted row continues from its
checkpoint) and the report is rebuilt from the folder alone.

A row that fails (bad config, missing data, divergence) is recorded with its reason; the other rows
still run, the report marks it, and the suite's exit code says that something failed.

`--jobs N` runs N rows at a time, each in its own process with its share of the cores. Why: the
practice's nets are small, and a small convolution does not keep two cores busy (the OpenMP barrier at
the end of each op waits for the slower thread); two one-thread rows side by side do more work than one
two-thread row. Each row's result is what it would be alone, up to float summation order (thread count).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import time
import traceback
from pathlib import Path

from cnnlab.runtime import distributed
from cnnlab.runtime.threads import cpu_capacity
from cnnlab.config import Config, load_config, read_data_preset, read_toml
from cnnlab.configs import suite_files
from cnnlab.errors import CnnlabError, DataMissing, RunInterrupted
from cnnlab.experiments.plan import DataCache
from cnnlab.experiments.run import run_experiment
from cnnlab.experiments.folds import fold_configs
from cnnlab.experiments.seeds import seed_configs
from cnnlab.records.report import write_report
from cnnlab.records.runs import Results, RunFolder, RunRecorder
from cnnlab.records.io import read_json, write_json
from cnnlab.wording import plural

SUITE_FILE = "_suite.toml"      # optional, in a suite folder: [[compare]] a = "row", b = "row", label = "..."


def load_rows(name: str, overrides: list, data: str | None, only: list[str] | None) -> tuple[list, list[dict]]:
    """[(config file, Config)] in run order, every row validated before any runs; and the comparisons."""
    files = suite_files(name)
    preset = read_data_preset(data)
    rows = [(f, load_config(f, overrides, preset)) for f in files]
    names = [c.name for _, c in rows]
    if len(set(names)) != len(names):
        raise CnnlabError(f"suite {name!r}: two rows share a name; names must be unique ({', '.join(names)})")
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise CnnlabError(f"--only: no row named {', '.join(sorted(unknown))} in suite {name!r} (rows: {', '.join(names)})")
        rows = [(f, c) for f, c in rows if c.name in only]
    suite_toml = files[0].parent / SUITE_FILE
    compare = read_toml(suite_toml).get("compare", []) if suite_toml.is_file() else []
    for c in compare:
        if not {"a", "b"} <= set(c) or c["a"] not in names or c["b"] not in names:
            raise CnnlabError(f"{suite_toml}: each [[compare]] needs a and b naming rows of the suite; got {c}")
    return rows, compare


def run_suite(name: str, runs_dir: str | Path, overrides: list, data: str | None = None,
              only: list[str] | None = None, progress: str = "bar", argv: list[str] | None = None,
              seeds: int | None = None, resume: str | None = None, jobs: int = 1,
              verbose: bool = False, launcher=None) -> tuple[Path, int]:
    """Run (or resume) every row of a suite; returns (suite folder, number of rows that did not finish ok).

    Under torchrun every rank runs every row together (each its shard of every batch); rank 0 alone
    creates and writes the suite folder, and tells the other ranks where it is."""
    dist = distributed.init_from_env()
    if jobs < 1:
        raise CnnlabError(f"--jobs {jobs}: give the number of rows to run at once, 1 or more")
    if jobs > 1 and dist.enabled:
        raise CnnlabError("--jobs runs rows as separate processes; under torchrun every process already runs "
                          "every row together: drop --jobs, or run without torchrun")
    if launcher is not None:           # cnnlab.experiments.launch.SlurmLauncher: rows as cluster jobs
        launcher.check(jobs, dist.enabled)
    main = dist.is_main
    progress = progress if main else "none"
    if resume:
        folder = Path(resume)
        if not (folder / "suite.json").is_file():
            raise CnnlabError(f"{folder}: not a suite folder (no suite.json)")
        spec = read_json(folder / "suite.json")
        name, overrides, data, only, seeds = spec["suite"], spec["overrides"], spec["data"], spec["only"], spec["seeds"]
        overrides = [o if isinstance(o, str) else tuple(o) for o in overrides]
    rows, compare = load_rows(name, overrides, data, only)
    seeds = seeds or max(c.seeds for _, c in rows)
    cache = DataCache()
    check_data(rows, cache, name)
    if not resume:
        # The suite's own folder name ('configs/..' names the folder above): RunFolder.create refuses a name
        # that is not one folder name, so nothing is written outside runs_dir.
        folder = RunFolder.create(runs_dir, Path(os.path.abspath(name)).name).path if main else None
        folder = distributed.broadcast_object(folder)
        if main:
            write_json(folder / "suite.json", {"suite": name, "overrides": [list(o) if isinstance(o, tuple) else o
                                                                             for o in overrides],
                                               "data": data, "only": only, "seeds": seeds,
                                               "rows": [c.name for _, c in rows], "compare": compare, "command": argv})
    t0 = time.perf_counter()
    work = []                          # (config of one seed, its file, its row folder), in report order
    for i, (f, cfg) in enumerate(rows, 1):
        for cfg_s in (k for s in seed_configs(cfg, seeds) for k in fold_configs(s)):    # folds = K: K runs each
            work.append((cfg_s, f, folder / "rows" / (f"{i:02d}-{cfg.name}" + (f"-seed{cfg_s.seed}" if seeds > 1 else "")
                                                      + (f"-fold-{cfg_s.fold}" if cfg_s.fold else ""))))
    try:
        if launcher is not None:
            failures = launcher.run(work, folder, argv)
        elif jobs > 1:
            failures = _run_parallel(work, jobs, argv)
        else:
            failures = sum(not _run_row(c, f, path, progress, cache, argv, main, table=verbose) for c, f, path in work)
    except RunInterrupted:
        raise RunInterrupted(folder) from None          # resume the suite, not the row
    if main:
        report = write_report(folder, title=f"cnnlab suite {name}")
        n = len(work)
        print(f"\nsuite {name}: {n - failures}/{plural(n, 'run')} ok in {time.perf_counter() - t0:.1f}s; report: {report}")
    return folder, failures


def check_data(rows: list, cache: DataCache, suite: str) -> None:
    """Load each distinct [data] table once before any row runs: missing data is one error, not one per row."""
    seen = set()
    for _, cfg in rows:
        key = repr(sorted(vars(cfg.data).items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            cache.get(cfg.data, quiet=True)
        except DataMissing as e:
            raise DataMissing(f"suite {suite!r}: {e}") from None
        except CnnlabError:
            pass                      # a row's own data problem: that row fails and is recorded


def _run_row(cfg: Config, source: Path, path: Path, progress: str, cache: DataCache, argv, main: bool,
             table: bool = False) -> bool:
    """Run one row into `path` (resuming or skipping what a previous attempt left); True when it ended ok.
    `table`: print its layer table (-v); else one line of counts (an EfficientNet's table is ~150 lines)."""
    run = RunFolder(path)
    previous = run.read_results() if path.is_dir() else None
    if previous and previous.get("status") == "ok":
        if main:
            print(f"== {cfg.name} (seed {cfg.seed}): finished earlier, skipped")
        return True
    resume = (run.checkpoints / "last.pt").is_file() and not previous
    distributed.barrier()                # every rank has looked before rank 0 clears a failed attempt
    if main:
        if not resume and path.is_dir():
            shutil.rmtree(path)          # a failed or never-checkpointed attempt starts over
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if resume and main:
        print(f"== {cfg.name} (seed {cfg.seed}): resuming from epoch {_checkpoint_epoch(run)}")
    try:
        out = run_experiment(cfg, path.parent, source=str(source), progress=progress, data_cache=cache,
                             argv=argv, resume=run if resume else None, folder=None if resume else run,
                             table=table)
        return out.results.ok
    except RunInterrupted:
        raise
    except CnnlabError as e:
        _record_failure(run, cfg, str(e), main=main)
    except Exception as e:  # noqa: BLE001 - one broken row must not take the suite down
        _record_failure(run, cfg, f"{type(e).__name__}: {e}", traceback.format_exc(), main)
    return False


def _run_parallel(work: list, jobs: int, argv) -> int:
    """The rows of `work`, `jobs` at a time, on `jobs` worker processes with cores // jobs threads each; one
    line as each row starts and ends (progress bars of parallel rows would overwrite each other). Returns
    the number of rows that failed.

    A worker runs row after row (torch imported and the data loaded once per worker, not once per row). A
    worker that dies (killed, out of memory) costs only its row: that row is recorded as failed and a fresh
    worker takes the next one, where a broken process pool would take every pending row with it."""
    jobs = min(jobs, len(work))
    threads = max(1, int(cpu_capacity()) // jobs)     # affinity and cgroup quota, as cnnlab.runtime.threads counts
    print(f"suite: {len(work)} runs, {jobs} at a time, {threads} thread{'s' * (threads > 1)} each", flush=True)
    todo, failures, done = list(work), 0, 0
    workers = [_Worker(threads, argv) for _ in range(jobs)]
    try:
        while todo or any(w.item for w in workers):
            for w in workers:
                if w.item is None and todo:
                    w.give(todo.pop(0))
            busy = [w for w in workers if w.item]
            ready = multiprocessing.connection.wait([c for w in busy for c in (w.conn, w.proc.sentinel)])
            for i, w in enumerate(workers):
                if w.item is None or not (w.conn in ready or w.proc.sentinel in ready):
                    continue
                (cfg, _, path), ok = w.item, w.result()
                if ok is None:                  # the worker died with the row: record it, start a fresh one
                    _record_failure(RunFolder(path), cfg, f"the row's process ended abruptly (exit code {w.proc.exitcode})")
                    workers[i] = _Worker(threads, argv)
                failures += not ok
                done += 1
                print(f"== {cfg.name} (seed {cfg.seed}): {_outcome(path) if ok else 'FAILED'}  [{done}/{len(work)}]",
                      flush=True)
    except KeyboardInterrupt:
        for w in workers:                       # Ctrl-C reached them too: let them save their epoch and exit
            w.proc.join(timeout=30)
        raise RunInterrupted("") from None        # run_suite names the suite folder
    for w in workers:
        w.stop()
    return failures


class _Worker:
    """One worker process and the pipe its rows go through; `item` is the row it is running, if any."""

    def __init__(self, threads: int, argv):
        ctx = multiprocessing.get_context("spawn")   # not fork: a forked copy of torch's thread pools can deadlock
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, argv), daemon=True, name="cnnlab-row")
        self.proc.start()
        child.close()
        self.item = None

    def give(self, item) -> None:
        cfg = item[0]
        self.item = item
        self.conn.send(item)
        print(f"== {cfg.name} (seed {cfg.seed}): started", flush=True)

    def result(self) -> bool | None:
        """The finished row's outcome (True ok, False failed and recorded), or None when the process died."""
        try:
            ok = self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):
            ok = None
        if ok is None:
            self.proc.join()
        self.item = None
        return ok

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=30)


def _worker_main(conn, threads: int, argv) -> None:
    import torch
    # The cap cnnlab.runtime.threads works under (it only ever lowers it); a count pinned by OMP_NUM_THREADS stays.
    torch.set_num_threads(min(threads, torch.get_num_threads()))
    cache = DataCache()                 # each data set loaded once per worker
    while (item := conn.recv()) is not None:
        cfg, source, path = item
        try:
            conn.send(_run_row(cfg, source, path, "none", cache, argv, True))
        except RunInterrupted:
            return


def _outcome(path: Path) -> str:
    r = RunFolder(path).read_results() or {}
    acc, sec = r.get("test_accuracy"), r.get("seconds")
    return (f"test accuracy {acc:.4f}" if acc is not None else "ok") + (f" ({sec:.1f}s)" if sec is not None else "")


def _checkpoint_epoch(run: RunFolder) -> int:
    from cnnlab.records.io import load_checkpoint
    return int(load_checkpoint(run.checkpoints / "last.pt")["epoch"])


def _record_failure(run: RunFolder, cfg: Config, reason: str, tb: str | None = None, main: bool = True,
                    quiet: bool = False) -> None:
    """Write the row's failed results (rank 0 only: `main`); `quiet`: the caller prints its own line."""
    recorder = RunRecorder(run if main else None)
    recorder.write_results(Results(name=cfg.name, status="failed", label=cfg.report.label or cfg.name, reason=reason,
                                   model=cfg.model.label, optimizer=cfg.train.optimizer, batch_size=cfg.train.batch_size,
                                   epochs_max=cfg.train.epochs, seed=cfg.seed,
                                   reference_accuracy=cfg.report.reference_accuracy))
    if tb:
        recorder.write_text("traceback.txt", tb)
    if main and not quiet:
        print(f"!! {cfg.name}: FAILED: {reason}")
