"""Model registry, in the spirit of timm: `@register_model` on a function, `create_model(name, ...)`.

A registered function takes `num_classes` (and any keyword arguments from `[model] args`) and returns an
nn.Module that maps a float (N, 3, H, W) batch to logits. Names that are not registered are looked up
as backbones (timm, torchvision, or `package.module:function`) in `cnnlab.models.backbones`. Besides
cnnlab's own nets, the registry holds those of installed plugins (entry point group `cnnlab.models`) and of
the modules a config names (`[model] module`): cnnlab.models.plugins.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from cnnlab.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its own name. Its docstring's first line is what `cnnlab models` shows."""
    _register(fn.__name__, fn)
    return fn


def _register(name: str, fn: Callable[..., nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


def _load_builtin() -> None:
    from cnnlab.models import cifar  # noqa: F401  (registers the CIFAR models)
    from cnnlab.models.plugins import load_entry_points
    load_entry_points(_MODELS, _register)          # installed plugins, once per process


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_MODELS)


def describe(name: str) -> str:
    _load_builtin()
    return _DESCRIPTIONS.get(name, "")


def is_registered(name: str) -> bool:
    _load_builtin()
    return name in _MODELS


def create_model(name: str, num_classes: int, image_size: int | None = None, **kwargs) -> nn.Module:
    """A registered model by name. Backbones (timm/torchvision/custom) go through backbones.create_backbone.

    image_size: the side of the square inputs, passed to functions that take an `image_size` argument (the
    practice's nets size their first dense layer from it, as Keras does); None keeps the function's default."""
    _load_builtin()
    if name not in _MODELS:
        from cnnlab.models.plugins import failures_hint
        raise ConfigError(f"[model] name = {name!r} is not a registered model; `cnnlab models` lists them "
                          f"(or use a timm/torchvision backbone name, or package.module:function){failures_hint()}")
    fn = _MODELS[name]
    if image_size is not None and "image_size" in inspect.signature(fn).parameters:
        kwargs["image_size"] = image_size
    try:
        return fn(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:       # an unknown or bad argument in [model] args
        raise ConfigError(f"[model.args] for {name!r}: {e}") from None


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def keras_init_(model: nn.Module) -> nn.Module:
    """Keras's default initialisation: glorot_uniform kernels and zero biases for Conv2d and Linear.

    PyTorch's default (kaiming_uniform with a=sqrt(5)) gives smaller weights; plain SGD at lr 0.01 is
    sensitive to that, so the practice's models use Keras's scheme to reproduce its curves.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def summary(model: nn.Module, input_shape: tuple[int, ...], trained: nn.Module | None = None) -> str:
    """A Keras-like table: one row per leaf layer with its output shape and parameter count. `trained`: the part
    the optimizer trains when it is not the whole model (a frozen backbone's head): only it counts as trainable."""
    rows, hooks = [], []

    def hook(mod, _inp, out):
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else "?"
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            n += mod.running_mean.numel() + mod.running_var.numel()
        # a [model] layers module shows the user's own call (models/layers.py), others their class
        rows.append((mod._cnnlab_name, getattr(mod, "layer_text", type(mod).__name__), shape, n))

    for name, mod in model.named_modules():
        if not list(mod.children()):
            mod._cnnlab_name = name
            hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # Counted as Keras counts: BatchNorm moving mean/variance are (non-trainable) parameters there.
    moving = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    total, trainable = count_params(model) + moving, count_params(trained or model, trainable_only=True)
    w = max([len(f"{n} ({t})") for n, t, _, _ in rows] + [20]) + 2
    line = "-" * (w + 36)
    out = [line, f"{'Layer (type)':<{w}}{'Output Shape':<24}{'Param #':>12}", "=" * (w + 36)]
    for n, t, s, p in rows:
        out.append(f"{f'{n} ({t})':<{w}}{str(s):<24}{p:>12,}")
    out += ["=" * (w + 36), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)


def mean_probability_logits(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """An ensemble's scores: the log of its members' mean probability (members along `dim`). Read as logits,
    they give the averaged prediction's argmax and its cross-entropy (not the average of the members')."""
    return torch.logsumexp(logits.float().log_softmax(-1), dim=dim) - math.log(logits.shape[dim])


def layers_set_from_data(model: nn.Module) -> list[nn.Module]:
    """The layers that are set from training images before the first step: those with `init_from_data(x)`
    (airnet's PatchWhitening)."""
    return [m for m in model.modules() if hasattr(m, "init_from_data")]


def init_from_data(model: nn.Module, x: torch.Tensor) -> bool:
    """Call `init_from_data(x)` on every layer that has one; True when any did."""
    layers = layers_set_from_data(model)
    for m in layers:
        m.init_from_data(x)
    return bool(layers)
