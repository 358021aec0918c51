"""One config, several seeds: the one definition of `seeds = N` (config key, --seeds, `cnnlab.run(seeds=N)`).

Seed s of N is the config with seed = seed + s: each fixes its own validation split, initial weights and
augmentation, so the spread over seeds is the noise a comparison must beat (see records/report.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cnnlab.config import Config
from cnnlab.experiments.run import RunOutcome, run_experiment
from cnnlab.records.report import mean_std


def seed_configs(cfg: Config, seeds: int | None = None) -> list[Config]:
    """The config once per seed: seed, seed + 1, ...; `seeds` None: the config's own `seeds`."""
    n = cfg.seeds if seeds is None else seeds
    return [dataclasses.replace(cfg, seed=cfg.seed + s) for s in range(n)]


def run_seeds(cfg: Config, runs_dir: str | Path, *, source: str, progress: str = "bar", argv: list[str] | None = None,
              callbacks: list = (), seeds: int | None = None) -> list[RunOutcome]:
    """Run the config with each of its seeds, one run folder each; with several, a line with the mean ± std.
    With `folds = K` (experiments/folds.py): K runs per seed, under one parent folder with their summary."""
    if cfg.folds and not cfg.fold:
        from cnnlab.experiments.folds import run_folds
        return run_folds(cfg, seed_configs(cfg, seeds), runs_dir, source=source, progress=progress, argv=argv,
                         callbacks=callbacks)
    outcomes = [run_experiment(c, runs_dir, source=source, progress=progress, argv=argv, callbacks=list(callbacks))
                for c in seed_configs(cfg, seeds)]
    if len(outcomes) > 1 and outcomes[0].path is not None:
        accuracies = [o.results.test_accuracy for o in outcomes if o.results.ok]
        print(f"== {cfg.name} over {len(outcomes)} seeds: test accuracy {mean_std(accuracies)}")
    return outcomes
