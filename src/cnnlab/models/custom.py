"""A `package.module:function` net: a whole classifier, or a backbone that cnnlab puts a head on ([model] kind).

Keras's `model.fit` trains the model you give it as it is, so a function that returns a classifier (its own last
layer, logits for the data's classes) is built and fed exactly as cnnlab's registered nets are: called with
`num_classes` (and `image_size`) when it takes them, the images at their own size, the run's normalization, no
head. A backbone (images -> pooled features) gets the dense head and the input preprocessing its weights declare
(models/backbones.py). `kind = "auto"` decides by the function's signature: only a function that takes
`num_classes` can size a last layer for the data, so it is a classifier; any other is a backbone, as before kinds
existed (and a classifier without `num_classes` says `kind = "classifier"`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError
from cnnlab.models.plugins import call_user_function, parameters

_BACKBONE_ONLY = ("head", "input_size", "mean", "std", "flip_average", "standardize_features")


def code_kind(cfg: ModelConfig, fn: Callable) -> str:
    """'classifier' or 'backbone' for the function [model] name names (see the module docstring)."""
    if cfg.kind != "auto":
        return cfg.kind
    return "classifier" if "num_classes" in parameters(fn) else "backbone"


def build_code_classifier(cfg: ModelConfig, fn: Callable, num_classes: int, image_size: int) -> nn.Module:
    """The whole net `fn` returns, checked to give (N, num_classes) logits on the run's images."""
    where = f"[model] name = {cfg.name!r}"
    why = ("it takes num_classes" if cfg.kind == "auto" else "kind = 'classifier'")
    defaults = ModelConfig()
    for key in _BACKBONE_ONLY:
        if getattr(cfg, key) != getattr(defaults, key):
            raise ConfigError(f"[model] {key} is for backbones, and {cfg.name!r} is a whole classifier ({why}): "
                              f"remove {key}, or set [model] kind = 'backbone' if the function returns pooled features")
    if "image_size" in cfg.args:        # the data's size is what the model sees, as for the registered nets
        raise ConfigError(f"[model.args] image_size: {cfg.name!r} is built for the images' own size; "
                          f"remove it and set [data] image_size instead")
    params = parameters(fn)
    kwargs = {**cfg.args, **({"num_classes": num_classes} if "num_classes" in params else {}),
              **({"image_size": image_size} if "image_size" in params else {})}
    model = call_user_function(fn, kwargs, where, cfg.weights)
    _check_logits(model, num_classes, image_size, where, why)
    return model


def _check_logits(model: nn.Module, num_classes: int, size: int, where: str, why: str) -> None:
    """One eval-mode forward on zeros (no randomness drawn, no BatchNorm statistics moved): a net whose output is
    not (N, num_classes) would otherwise fail at the loss with a shape error, or train on the wrong classes."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
    except Exception as e:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"{where}: its forward on a (2, 3, {size}, {size}) batch raised {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:300]}") from None
    finally:
        model.train(was)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ConfigError(f"{where} is a whole classifier ({why}), but it gives {shape} on a (2, 3, {size}, {size}) "
                          f"batch, not (2, {num_classes}) logits for the data's {num_classes} classes: give the "
                          f"function a num_classes argument for its last layer, or set [model] kind = 'backbone' "
                          f"if it returns pooled features")
