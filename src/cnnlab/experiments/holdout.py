"""Which training images a run validates on: a hold-out of [data] val_fraction, or one fold of a K-fold
cross-validation (StratifiedKFold, the seed as its random_state). The runs of `folds = K` are in folds.py."""
from __future__ import annotations

import numpy as np
import torch

from cnnlab.config import DataConfig
from cnnlab.errors import DataError

DEFAULT_VAL = DataConfig()        # what [data] holds out when a config says nothing


def fold_indices(y: torch.Tensor, folds: int, seed: int, classes: list[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train positions, validation positions)] of each fold, sorted, as int64 tensors into `y`."""
    from sklearn.model_selection import StratifiedKFold
    labels = y.detach().cpu().numpy()
    values, counts = np.unique(labels, return_counts=True)
    if counts.min(initial=folds) < folds:
        c = int(values[counts.argmin()])
        name = classes[c] if classes else f"class {c}"
        raise DataError(f"folds = {folds}: {name} has only {counts.min()} training images, but each of the {folds} "
                        f"folds validates on some of every class; use --folds {max(2, int(counts.min()))} or fewer, "
                        f"or more images of that class")
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    return [(torch.from_numpy(np.sort(tr)).long(), torch.from_numpy(np.sort(va)).long()) for tr, va in split]


def holdout(y: torch.Tensor, data: DataConfig, seed: int, folds: int = 0, fold: int = 0,
            classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train, validation) positions of a run and a note on the [data] keys folds replace: fold `fold` (1..K) of
    `folds` = K, or [data] val_fraction / val_split as usual (folds = 0)."""
    from cnnlab.data import split_train_val
    if not folds:
        return (*split_train_val(y, data.val_fraction, data.val_split, seed), [])
    tr, va = fold_indices(y, folds, seed, classes)[max(fold, 1) - 1]
    given = [f"{k} = {getattr(data, k)!r}" for k in ("val_fraction", "val_split")
             if getattr(data, k) != getattr(DEFAULT_VAL, k)]
    notes = [f"[data] {' and '.join(given)} not used: with folds = {folds} the validation split is fold "
             f"{max(fold, 1)}, 1/{folds} of the training split, stratified"] if given else []
    return tr, va, notes
