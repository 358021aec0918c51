"""Suites: a folder of configs run in order into one folder, then one report.

A row that fails (bad config, missing data, divergence) is recorded with its reason; the other rows
still run, the report marks it, and the suite's exit code says that something failed.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from cnnlab.config import load_config, read_toml
from cnnlab.configs import data_preset, suite_files
from cnnlab.errors import CnnlabError
from cnnlab.experiment import DataCache, run_experiment
from cnnlab.report import write_report
from cnnlab.runs import RunFolder


def run_suite(name: str, runs_dir: str | Path, overrides: list[str], data: str | None = None,
              only: list[str] | None = None, progress: str = "bar", argv: list[str] | None = None) -> tuple[Path, int]:
    """Run every row of a suite; returns (suite folder, number of rows that did not finish ok)."""
    files = suite_files(name)
    preset = None
    if data:
        p = data_preset(data)
        preset = (read_toml(p), str(p))
    configs = [(f, load_config(f, overrides, preset)) for f in files]   # check every row before running any
    if only:
        unknown = set(only) - {c.name for _, c in configs}
        if unknown:
            raise CnnlabError(f"--only: no row named {', '.join(sorted(unknown))} in suite {name!r} "
                              f"(rows: {', '.join(c.name for _, c in configs)})")
        configs = [(f, c) for f, c in configs if c.name in only]
    folder = RunFolder.create(runs_dir, Path(name).name).path
    cache, failures = DataCache(), 0
    t0 = time.perf_counter()
    for i, (f, cfg) in enumerate(configs, 1):
        try:
            run = run_experiment(cfg, folder / "rows", source=str(f), progress=progress, data_cache=cache, argv=argv,
                                 folder_prefix=f"{i:02d}-")
            if (run.read_results() or {}).get("status") != "ok":
                failures += 1
        except CnnlabError as e:
            failures += 1
            _record_failure(folder / "rows", f"{i:02d}-", cfg, str(e))
            print(f"!! {cfg.name}: FAILED: {e}")
        except Exception as e:  # noqa: BLE001 - one broken row must not take the suite down
            failures += 1
            _record_failure(folder / "rows", f"{i:02d}-", cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
            print(f"!! {cfg.name}: FAILED: {type(e).__name__}: {e}")
    report = write_report(folder, title=f"cnnlab suite {name}")
    print(f"\nsuite {name}: {len(configs) - failures}/{len(configs)} rows ok in {time.perf_counter() - t0:.1f}s; "
          f"report: {report}")
    return folder, failures


def _record_failure(runs_dir: Path, prefix: str, cfg, reason: str, tb: str | None = None) -> None:
    run = RunFolder.create(runs_dir, prefix + cfg.name)
    run.write_results({"name": cfg.name, "label": cfg.report.label or cfg.name, "status": "failed", "reason": reason,
                       "model": cfg.model.name, "optimizer": cfg.train.optimizer, "batch_size": cfg.train.batch_size,
                       "epochs_max": cfg.train.epochs, "epochs_run": 0, "test_accuracy": None, "test_loss": None,
                       "seconds": 0.0, "seed": cfg.seed,
                       "reference_accuracy": None if cfg.report.reference_accuracy != cfg.report.reference_accuracy
                       else cfg.report.reference_accuracy})
    if tb:
        run.write_text("traceback.txt", tb)
