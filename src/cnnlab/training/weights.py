"""Class weights of the training loss: `[train] class_weights = "balanced"` or one weight per class.

"balanced" is scikit-learn's rule (compute_class_weight): n / (K * count of the class) on the training
split's labels, so the weights average 1 over the training images and the loss keeps its scale. Keras's
`fit(class_weight=...)` semantics: only the training loss is weighted; validation and test losses (and so
early stopping on val_loss) stay the plain mean, comparable with an unweighted run.
"""
from __future__ import annotations

import numpy as np
import torch

from cnnlab.errors import ConfigError


def class_weights(spec: str | list[float], y_train: torch.Tensor, classes: list[str],
                  source: str = "<config>") -> torch.Tensor | None:
    """float32 (K,) weights for [train] class_weights on the training labels, or None for "none"."""
    k = len(classes)
    if isinstance(spec, list):
        if len(spec) != k:
            raise ConfigError(f"{source}: [train] class_weights lists {len(spec)} weights but the data has {k} "
                              f"classes ({', '.join(classes[:5])}{', ...' if k > 5 else ''}); give one per class, "
                              f"in label order, or use \"balanced\"")
        return torch.tensor([float(v) for v in spec], dtype=torch.float32)
    if spec != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight
    y = y_train.detach().cpu().numpy()
    present = np.unique(y)
    missing = [classes[c] for c in range(k) if c not in set(present.tolist())]
    if missing:
        raise ConfigError(f"{source}: [train] class_weights = \"balanced\" needs training images of every class; "
                          f"{', '.join(missing[:5])} {'has' if len(missing) == 1 else 'have'} none (check [data] "
                          f"classes and max_train_per_class, or give the weights as a list)")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(k), y=y), dtype=torch.float32)


def describe(weights: torch.Tensor | None, classes: list[str]) -> dict | None:
    """{class: weight} as results.json records it (rounded to 4 decimals), or None without weights."""
    if weights is None:
        return None
    return {c: round(float(w), 4) for c, w in zip(classes, weights.tolist())}
