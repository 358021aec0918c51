"""Cross-validation for small data: `folds = K` (`cnnlab run CONFIG --folds K`, `cnnlab.run(..., folds=K)`).

The training split is cut into K stratified parts by scikit-learn's StratifiedKFold (shuffled, the seed as its
random_state: the same seed, the same parts). Run i is an ordinary run whose validation split is part i and
whose training split is the other K - 1; the test split, when there is one, is the same for all. Its config
records `folds = K, fold = i`, so `cnnlab rerun` / `--resume` of one fold folder redoes exactly that fold.

    runs/<name>-folds-<date>/            folds.json, folds.md: each fold's scores and their mean ± std
        fold-1/ ... fold-K/              ordinary run folders (with several seeds: seed<S>-fold-<i>/)

With seeds = N the K folds run for each seed (each seed cuts its own parts): K x N runs. In a suite each row
runs its K folds (rows/<NN>-<name>[-seed<S>]-fold-<i>/) and the report groups them as one row: mean ± std.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from cnnlab.config import Config
from cnnlab.records.io import atomic_write, write_json
from cnnlab.records.runs import RunFolder

SUMMARY = "folds.json"


def fold_configs(cfg: Config) -> list[Config]:
    """The config once per fold (fold = 1..K); a config without folds, or already one fold, as it is."""
    if not cfg.folds or cfg.fold:
        return [cfg]
    return [dataclasses.replace(cfg, fold=i) for i in range(1, cfg.folds + 1)]


def fold_folder_name(cfg: Config, seeds: int) -> str:
    return (f"seed{cfg.seed}-" if seeds > 1 else "") + f"fold-{cfg.fold}"


def run_folds(cfg: Config, seeded: list[Config], runs_dir: str | Path, *, source: str, progress: str = "bar",
              argv: list[str] | None = None, callbacks: list = ()) -> list:
    """Every fold of every seed's config (`seeded`: cfg once per seed) into one parent folder, then folds.json /
    folds.md and one summary line."""
    from cnnlab.experiments.run import run_experiment
    from cnnlab.runtime import distributed
    configs = [f for s in seeded for f in fold_configs(s)]
    n_seeds = len({c.seed for c in configs})
    main = distributed.init_from_env().is_main
    parent = RunFolder.create(runs_dir, f"{cfg.name}-folds").path if main else None
    parent = distributed.broadcast_object(parent)
    outcomes = []
    for c in configs:
        folder = parent / fold_folder_name(c, n_seeds)
        if main:
            folder.mkdir()
        outcomes.append(run_experiment(c, parent, source=source, progress=progress, argv=argv,
                                       folder=RunFolder(folder), callbacks=list(callbacks)))
    if main:
        summary = summarize(parent, cfg, [(c, o.path, o.results.to_json()) for c, o in zip(configs, outcomes)])
        print(summary_line(cfg.name, summary) + f"  -> {parent}")
    return outcomes


# ---------------------------------------------------------------- the summary

def mean_std(values: list[float]) -> dict:
    """{"mean", "std", "n"}: std is the sample standard deviation (n - 1), as the report's mean ± std."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(parent: Path, cfg: Config, runs: list[tuple[Config, Path, dict]]) -> dict:
    """folds.json and folds.md in `parent` from each fold's results.json values; returns what folds.json holds."""
    rows = [{"seed": c.seed, "fold": c.fold, "folder": Path(p).name, "status": r.get("status"),
             "val_accuracy": r.get("val_accuracy"), "val_loss": r.get("val_loss"),
             "test_accuracy": r.get("test_accuracy"), "test_macro_f1": r.get("test_macro_f1")}
            for c, p, r in runs]
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {"name": cfg.name, "folds": cfg.folds, "seeds": sorted({r["seed"] for r in rows}), "runs": rows,
               **{key: mean_std([r[key] for r in ok]) for key in ("val_accuracy", "test_accuracy", "test_macro_f1")}}
    write_json(parent / SUMMARY, summary)
    with atomic_write(parent / "folds.md") as f:
        f.write(summary_table(summary))
    return summary


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def _pm(s: dict) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def summary_table(summary: dict) -> str:
    head = "| seed | fold | validation accuracy | test accuracy | test macro F1 | status |\n|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['seed']} | {r['fold']} | {_fmt(r['val_accuracy'])} | {_fmt(r['test_accuracy'])} | "
                   f"{_fmt(r['test_macro_f1'])} | {r['status']} |\n" for r in summary["runs"])
    n = summary["val_accuracy"]["n"]
    total = (f"| mean ± std (n={n}) | | {_pm(summary['val_accuracy'])} | {_pm(summary['test_accuracy'])} | "
             f"{_pm(summary['test_macro_f1'])} | |\n")
    return f"# {summary['name']}: {summary['folds']}-fold cross-validation\n\n{head}{body}{total}"


def summary_line(name: str, summary: dict) -> str:
    runs = len(summary["runs"])
    seeds = len(summary["seeds"])
    what = f"{summary['folds']} folds" + (f" x {seeds} seeds" if seeds > 1 else "")
    test = f", test accuracy {_pm(summary['test_accuracy'])}" if summary["test_accuracy"]["n"] else ""
    failed = runs - summary["val_accuracy"]["n"]
    return (f"== {name} over {what}: validation accuracy {_pm(summary['val_accuracy'])}{test}"
            + (f" ({failed} of {runs} runs without a score)" if failed else ""))
