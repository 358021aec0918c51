"""The frozen-feature recipe against a tuned linear model on the same cached features.

The yardstick a statistician would bring: scikit-learn's LogisticRegression on the backbone's features,
standardized, with C chosen by 5-fold stratified cross-validation on the whole training split (it sees the
validation images cnnlab holds out, as training data). cnnlab's row is `cifar10_lite0_frozen_best.toml`
(the recipe of practice-birds/04_frozen_best) trained by cnnlab itself; both are scored on the same test
images, and the recipe must score at least what the linear model scores. The features are the recipe's own:
the image's and its mirror's averaged, computed once and cached (transfer/features.py), so the second
model costs seconds.

    python ../shared/data/to_cifar_python.py /tmp/fdata       # the real CIFAR-10 in the python layout
    PYTHONPATH=examples python benchmarks/transfer/linear_baseline.py --data-dir /tmp/fdata \
        --per-class 100 400 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnnlab.config import load_config
from cnnlab.experiments.prepare import prepare
from cnnlab.experiments.run import run_experiment

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "cifar10_lite0_frozen_best.toml"
C_GRID = np.logspace(-4, 2, 13)     # 1e-4 .. 1e2, half a decade apart


def tuned_logistic(x_train: np.ndarray, y_train: np.ndarray, seed: int) -> tuple[GridSearchCV, float]:
    """LogisticRegression on standardized features, C by stratified 5-fold CV; (the fitted search, seconds)."""
    start = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    search = GridSearchCV(model, {"logisticregression__C": C_GRID}, scoring="accuracy",
                          cv=StratifiedKFold(5, shuffle=True, random_state=seed), n_jobs=1)
    search.fit(x_train, y_train)
    return search, time.perf_counter() - start


def one(per_class: int, seed: int, data_dir: str, runs_dir: str) -> dict:
    overrides = [("data.data_dir", data_dir), ("data.max_train_per_class", per_class), ("seed", seed)]
    cfg = load_config(CONFIG, overrides)
    outcome = run_experiment(cfg, runs_dir, source=str(CONFIG), progress="line")
    # the same plan again: the features come from the cache the run just filled
    plan = prepare(cfg, source=str(CONFIG), progress="none")
    assert plan.extra.get("features_from_cache"), "the linear model must see the run's own cached features"
    ds = plan.data
    search, seconds = tuned_logistic(ds.x_train.numpy(), ds.y_train.numpy(), seed)
    lr_acc = float((search.predict(ds.x_test.numpy()) == ds.y_test.numpy()).mean())
    return {"per_class": per_class, "seed": seed, "train": len(ds.y_train), "test": len(ds.y_test),
            "recipe": outcome.results.test_accuracy, "recipe_seconds": outcome.results.seconds,
            "logreg": lr_acc, "logreg_C": float(search.best_params_["logisticregression__C"]),
            "logreg_seconds": seconds}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with cifar-10-batches-py/")
    ap.add_argument("--per-class", type=int, nargs="+", default=[100, 400],
                    help="training images a class (before the recipe's 10%% validation split)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", default=None, help="where cnnlab's run folders go (default: a temporary folder)")
    a = ap.parse_args()
    runs_dir = a.runs_dir or tempfile.mkdtemp(prefix="linear_baseline_")
    rows = [one(n, s, a.data_dir, runs_dir) for n in a.per_class for s in a.seeds]
    print("\n| train images | test images | seed | cnnlab frozen recipe | tuned LogisticRegression (C) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['train']} | {r['test']} | {r['seed']} | {r['recipe']:.4f} | {r['logreg']:.4f} "
              f"(C={r['logreg_C']:.3g}) |")
    print("\n| train images | cnnlab frozen recipe | tuned LogisticRegression | recipe - logreg | "
          "cnnlab run s | logreg CV s |")
    print("|---|---|---|---|---|---|")
    for n in a.per_class:
        rs = [r for r in rows if r["per_class"] == n]
        rec, lr = [r["recipe"] for r in rs], [r["logreg"] for r in rs]
        print(f"| {rs[0]['train']} | {mean_std(rec)} | {mean_std(lr)} | {statistics.mean(rec) - statistics.mean(lr):+.4f} "
              f"| {statistics.mean(r['recipe_seconds'] for r in rs):.1f} "
              f"| {statistics.mean(r['logreg_seconds'] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
