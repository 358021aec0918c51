"""[search] C: a linear head on frozen features fitted as scikit-learn's LogisticRegression.

A linear head on fixed features is a convex problem: multinomial logistic regression with an L2 penalty. Adam with
weight decay and early stopping only approaches its optimum, and the usual 10% validation hold-out costs a tenth
of the training images; on CIFAR-10 with EfficientNet-Lite0 features that left the grid recipe 0.2-0.9 points
below a LogisticRegression whose C was chosen by cross-validation (benchmarks/transfer/linear_baseline.py). So the
recipe does what a statistician would: C chosen by stratified K-fold cross-validation over every training image
(the folds seeded by the run's seed), then one fit on all of them, solved by L-BFGS to convergence, along the grid of C from
the strongest penalty to the weakest, each fit warm-started from the last. The solution
goes into the head's Linear layer (its Standardize layer, when there is one, holds the same statistics the fit
saw), so the run folder, `cnnlab.load`, predict and export use it as any head.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

FIT_ITERATIONS = 3000        # L-BFGS iterations at most: converged well before on standardized features
# scikit-learn's default tol (1e-4) stops L-BFGS short of the optimum: one test image in 500 on CIFAR-10 features,
# either way. Choosing C needs only the ranking of the grid's values, so the cross-validation keeps the default;
# the one fit that becomes the head is solved to 1e-6, the optimum for every practical purpose.
CV_TOLERANCE = 1e-4
FINAL_TOLERANCE = 1e-6


def fit_logistic_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: list[float],
                      folds: int, seed: int, quiet: bool) -> dict:
    """Fit `head` (a linear head: [Standardize,] Linear) on features x (N, D) with labels y; returns what
    results.json records (C chosen, cross-validated accuracy of each C, seconds)."""
    from sklearn.model_selection import StratifiedKFold

    linear = _the_linear_layer(head)
    t0 = time.perf_counter()
    z = _as_the_head_sees_them(head, x)
    labels = y.cpu().numpy()
    present = np.unique(labels)
    k = min(folds, int(np.bincount(labels)[present].min()))
    if k < 2:
        from cnnlab.errors import DataError
        raise DataError(f"[search] C chooses C by cross-validation, but a class has only one training image: "
                        f"give every class at least 2 (better {folds}), or remove [search] C")
    grid = sorted(float(c) for c in grid)
    correct = np.zeros(len(grid))
    for tr, va in StratifiedKFold(k, shuffle=True, random_state=seed).split(z, labels):
        for i, model in enumerate(_path(z[tr], labels[tr], grid)):
            correct[i] += (model.predict(z[va]) == labels[va]).sum()
    accuracy = correct / len(labels)
    best = int(np.argmax(accuracy))              # the first of equals: the smallest C, the strongest penalty
    model = list(_path(z, labels, grid[:best + 1], FINAL_TOLERANCE))[-1]
    _copy_solution(linear, model, present, num_classes)
    record = {"C": grid[best], "cv_accuracy": round(float(accuracy[best]), 6), "cv_folds": k,
              "trials": [{"C": c, "cv_accuracy": round(float(a), 6)} for c, a in zip(grid, accuracy)],
              "images": int(len(labels)), "seconds": round(time.perf_counter() - t0, 3)}
    if not quiet:
        print(f"search: logistic regression on {len(labels)} training images, C = {record['C']:g} by {k}-fold "
              f"cross-validation (accuracy {record['cv_accuracy']:.4f}; {len(grid)} values, {record['seconds']:.1f}s)")
    return record


def _path(z: np.ndarray, y: np.ndarray, grid: list[float], tol: float = CV_TOLERANCE):
    """LogisticRegression fitted at each C of an ascending grid, each fit starting from the previous solution
    (a weaker penalty moves the optimum a little: a few L-BFGS iterations instead of a cold start). Yields the
    model after each fit (the same object, refitted)."""
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(max_iter=FIT_ITERATIONS, tol=tol, warm_start=True)
    for c in grid:
        model.set_params(C=c)
        with warnings.catch_warnings():          # a C that cannot converge in FIT_ITERATIONS is still scored
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(z, y)
        yield model


def _the_linear_layer(head: nn.Module) -> nn.Linear:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        from cnnlab.errors import ConfigError
        raise ConfigError("[search] C fits a linear head, but this head has "
                          f"{len(linears)} Linear layers: set [model] head = []")
    return linears[0]


@torch.no_grad()
def _as_the_head_sees_them(head: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The features after the head's Standardize layer (when it has one): what its Linear layer multiplies."""
    std = getattr(head, "standardize", None)
    x = x.float().to(std.mean.device) if std is not None else x.float()
    return (std(x) if std is not None else x).double().cpu().numpy()


@torch.no_grad()
def _copy_solution(linear: nn.Linear, model, present: np.ndarray, num_classes: int) -> None:
    """coef_/intercept_ into the Linear layer. Binary problems have one row (the logit of class 1 against class 0):
    split it as -w/2, +w/2, which gives the same softmax. A class without training images keeps a logit far below
    the others (it is never predicted, as in any head that never saw it)."""
    coef, bias = model.coef_, model.intercept_
    if coef.shape[0] == 1:
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    w = np.zeros((num_classes, coef.shape[1]))
    b = np.full(num_classes, -1e4)
    w[present], b[present] = coef, bias
    linear.weight.copy_(torch.from_numpy(w))
    linear.bias.copy_(torch.from_numpy(b))
