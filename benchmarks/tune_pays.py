"""Does tuning pay? (issue 26.5) A fixed budget of `cnnlab tune` trials, then the chosen config at full length
over 3 seeds, against the untuned recipe over the same 3 seeds, in one process on one machine.

    tune/best.toml   `best` with learning rate, weight decay, label smoothing, batch size and crop padding
                     tuned on 8-epoch trials (median pruning); the winner trained at 30 epochs
    tune/es.toml     the practice's EarlyStopping row (BN before ReLU) with lr, batch size, patience and
                     zoom tuned; each trial is the row at its own length

Trials choose on the validation split; the test split is scored once per study (study.json) and by the final
runs. Every figure is printed with the seconds it cost.

    python benchmarks/tune_pays.py --data-dir /tmp/cifar10py --trials 20 --seeds 0 1 2 [--only best|es]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cnnlab

HERE = Path(__file__).resolve().parent
CASES = {
    # name: (tune config, the untuned recipe, overrides for the full-length runs of the chosen config)
    "best": (HERE / "tune" / "best.toml", "best", {"train.epochs": 30, "train.warmup_epochs": 3}),
    "es": (HERE / "tune" / "es.toml", "practice/11_es", {}),
}


def runs_of(config, seeds: list[int], data_dir: str, runs_dir: Path, overrides: dict) -> tuple[list[float], float]:
    """Test accuracies of `config` over `seeds`, and the seconds of the whole."""
    start = time.perf_counter()
    accs = []
    for seed in seeds:
        run = cnnlab.run(config, data="cifar10s", data_dir=data_dir, runs_dir=runs_dir, progress="line",
                         seed=seed, **overrides)
        accs.append(run.results["test_accuracy"])
    return accs, time.perf_counter() - start


def pm(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def case(name: str, trials: int, seeds: list[int], data_dir: str, out: Path) -> dict:
    tune_config, recipe, full = CASES[name]
    start = time.perf_counter()
    study = cnnlab.tune(tune_config, trials=trials, data="cifar10s", data_dir=data_dir, runs_dir=out / "studies",
                        progress="line")
    tune_s = time.perf_counter() - start
    s = study.summary
    tuned, tuned_s = runs_of(study.best_config, seeds, data_dir, out / f"{name}-tuned", full)
    base, base_s = runs_of(recipe, seeds, data_dir, out / f"{name}-recipe", {})
    return {"name": name, "study": str(study.path), "counts": s.get("counts"), "best": s.get("best"),
            "study_test": s.get("test"), "tune_s": tune_s, "tuned": tuned, "tuned_s": tuned_s,
            "recipe": base, "recipe_s": base_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with cifar-10-batches-py/")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    ap.add_argument("--out", default="runs/tune_pays")
    a = ap.parse_args()
    out = Path(a.out)
    rows = [case(n, a.trials, a.seeds, a.data_dir, out) for n in a.only]
    print(f"\n| recipe | untuned, {len(a.seeds)} seeds | tuned, {len(a.seeds)} seeds | chosen (trial, val) | "
          f"tune s | tuned runs s | untuned runs s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        best = r["best"] or {}
        chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.get("params", {}).items())
        print(f"| {r['name']} | {pm(r['recipe'])} | {pm(r['tuned'])} | {chosen} (trial {best.get('trial')}, "
              f"{best.get('value', float('nan')):.4f}) | {r['tune_s']:.0f} | {r['tuned_s']:.0f} | {r['recipe_s']:.0f} |")
    for r in rows:
        print(f"{r['name']}: {r['counts']}; study test (once, chosen trial): {r['study_test']}; {r['study']}")


if __name__ == "__main__":
    main()
