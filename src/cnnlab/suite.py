"""Suites: a folder of configs run in order into one folder, then one report.

<suite folder>/suite.json records what was asked (suite, overrides, data preset, rows, seeds) and the
comparisons to test; rows run into <suite folder>/rows/<NN>-<name>[-seed<S>]/. So a killed suite
resumes (`cnnlab suite --resume FOLDER`: finished rows are skipped, an interrupted row continues from its
checkpoint) and the report is rebuilt from the folder alone.

A row that fails (bad config, missing data, divergence) is recorded with its reason; the other rows
still run, the report marks it, and the suite's exit code says that something failed.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
import traceback
from pathlib import Path

from cnnlab import distributed
from cnnlab.config import Config, load_config, read_toml
from cnnlab.configs import data_preset, suite_files
from cnnlab.errors import CnnlabError, DataMissing, RunInterrupted
from cnnlab.experiment import DataCache, run_experiment
from cnnlab.report import write_report
from cnnlab.runs import Results, RunFolder, RunRecorder, read_json, write_json

SUITE_FILE = "_suite.toml"      # optional, in a suite folder: [[compare]] a = "row", b = "row", label = "..."


def load_rows(name: str, overrides: list, data: str | None, only: list[str] | None) -> tuple[list, list[dict]]:
    """[(config file, Config)] in run order, every row validated before any runs; and the comparisons."""
    files = suite_files(name)
    preset = None
    if data:
        p = data_preset(data)
        preset = (read_toml(p), str(p))
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
              seeds: int | None = None, resume: str | None = None) -> tuple[Path, int]:
    """Run (or resume) every row of a suite; returns (suite folder, number of rows that did not finish ok).

    Under torchrun every rank runs every row together (each its shard of every batch); rank 0 alone
    creates and writes the suite folder, and tells the other ranks where it is."""
    main = distributed.init_from_env().is_main
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
        folder = RunFolder.create(runs_dir, Path(name).name).path if main else None
        folder = distributed.broadcast_object(folder)
        if main:
            write_json(folder / "suite.json", {"suite": name, "overrides": [list(o) if isinstance(o, tuple) else o
                                                                             for o in overrides],
                                               "data": data, "only": only, "seeds": seeds,
                                               "rows": [c.name for _, c in rows], "compare": compare, "command": argv})
    failures, t0 = 0, time.perf_counter()
    for i, (f, cfg) in enumerate(rows, 1):
        for s in range(seeds):
            cfg_s = dataclasses.replace(cfg, seed=cfg.seed + s)
            path = folder / "rows" / (f"{i:02d}-{cfg.name}" + (f"-seed{cfg_s.seed}" if seeds > 1 else ""))
            failures += not _run_row(cfg_s, f, path, progress, cache, argv, main)
    if main:
        report = write_report(folder, title=f"cnnlab suite {name}")
        n = len(rows) * seeds
        print(f"\nsuite {name}: {n - failures}/{n} runs ok in {time.perf_counter() - t0:.1f}s; report: {report}")
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


def _run_row(cfg: Config, source: Path, path: Path, progress: str, cache: DataCache, argv, main: bool) -> bool:
    """Run one row into `path` (resuming or skipping what a previous attempt left); True when it ended ok."""
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
                             argv=argv, resume=run if resume else None, folder=None if resume else run)
        return out.results.ok
    except RunInterrupted:
        raise
    except CnnlabError as e:
        _record_failure(run, cfg, str(e), main=main)
    except Exception as e:  # noqa: BLE001 - one broken row must not take the suite down
        _record_failure(run, cfg, f"{type(e).__name__}: {e}", traceback.format_exc(), main)
    return False


def _checkpoint_epoch(run: RunFolder) -> int:
    from cnnlab.runs import load_checkpoint
    return int(load_checkpoint(run.checkpoints / "last.pt")["epoch"])


def _record_failure(run: RunFolder, cfg: Config, reason: str, tb: str | None = None, main: bool = True) -> None:
    recorder = RunRecorder(run if main else None)
    recorder.write_results(Results(name=cfg.name, status="failed", label=cfg.report.label or cfg.name, reason=reason,
                                   model=cfg.model.name, optimizer=cfg.train.optimizer, batch_size=cfg.train.batch_size,
                                   epochs_max=cfg.train.epochs, seed=cfg.seed,
                                   reference_accuracy=cfg.report.reference_accuracy))
    if tb:
        recorder.write_text("traceback.txt", tb)
    if main:
        print(f"!! {cfg.name}: FAILED: {reason}")
