"""Pretrained backbones with a dense head, for transfer learning.

[model] name picks the backbone:
  - a timm model name ("resnet50", "convnext_tiny", ...), the default family;
  - "tv:<name>" for a torchvision model ("tv:resnet50");
  - "package.module:function" for your own function returning an nn.Module that maps images to
    pooled feature vectors (N, D); it declares the preprocessing its weights expect as timm does, with a
    `pretrained_cfg` dict attribute on the module ("mean", "std", "input_size" = (3, H, W); "crop_pct" and
    "interpolation" may be there too, cnnlab does not use them).
[model] weights picks the weights:
  - "" -> the backbone's default pretrained tag (timm downloads and caches it on first use);
  - a tag ("tv_in1k", "a1_in1k"; for torchvision a weights enum name such as "IMAGENET1K_V1");
  - a local file (.pth/.pt/.safetensors/.bin): the state dict of that architecture;
  - "none": random initialisation.
Each backbone brings its own input preprocessing (mean/std, input size) from its pretrained config;
[model] mean / std / input_size override it.
"""
from __future__ import annotations

import urllib.parse
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from cnnlab.data.preprocess import Normalizer
from cnnlab.models.parts import BackboneModel
from cnnlab.config import ModelConfig
from cnnlab.models.weights import load_state
from cnnlab.errors import CnnlabError, ConfigError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PreprocessingWarning(UserWarning):
    """A backbone whose input mean/std cnnlab had to guess (see _override_normalizer)."""


class TransferNet(BackboneModel):
    """backbone (images -> pooled features) followed by a dense head (features -> logits).

    flip_average: the features are the mean of the image's and its mirror's (a flip-invariant model; frozen
    runs train the head on that mean, so the rebuilt model must take it too). standardize: the head starts
    with a Standardize layer (see there)."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, hidden: list[int],
                 flip_average: bool = False, standardize: bool = False):
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.flip_average = flip_average
        self.head = make_head(num_features, num_classes, hidden, standardize)
        self.bn_frozen = False        # [train] freeze_bn_stats: the backbone's BatchNorm layers stay in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flip_average:
            return self.head(self.backbone(x).flatten(1))
        # Both views in one backbone call: one pass of its layers (and one row each in `summary`).
        f = self.backbone(torch.cat([x, x.flip(-1)])).flatten(1)
        return self.head(mean_of_views(list(f.chunk(2))))

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen backbone stays in eval mode: its BatchNorm statistics must not drift.
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        elif mode and self.bn_frozen:
            # Fine-tuning with the pretrained statistics: the backbone computes exactly the features its frozen
            # (eval-mode) forward gives, the ones a linear probe trained the head on; scale and shift still train.
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def reset_classifier(self, num_classes: int, hidden: list[int] | None = None) -> None:
        hidden = hidden if hidden is not None else [m.out_features for m in self.head if isinstance(m, nn.Linear)][:-1]
        self.head = make_head(self.num_features, num_classes, hidden, hasattr(self.head, "standardize"))


def mean_of_views(views: list[torch.Tensor]) -> torch.Tensor:
    """float32 mean of the features of several views of the same images. The one definition, used by the
    model's forward and by the feature cache alike, so both give the head the same numbers."""
    return sum(v.float() for v in views) / len(views)


class Standardize(nn.Module):
    """(x - mean) / std per feature, with the training split's statistics (set by `fit` before training).

    Pooled features differ in scale by orders of magnitude; standardized, one weight decay suits every
    weight of the head and Adam starts well-conditioned. Buffers, not parameters: they are in the head's
    checkpoint (so the rebuilt model and its exports apply them) and the optimizer leaves them alone."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, chunk: int = 65536) -> None:
        """x: (N, D) features on the device, or streamed ones (cnnlab.data.stream.Rows, read by slices)."""
        if isinstance(x, torch.Tensor):
            x = x.double()
            mean, std = x.mean(0), x.std(0)
        else:                       # two passes over the blocks: the same statistics, in float64
            blocks = lambda: (x[i:i + chunk].double() for i in range(0, len(x), chunk))  # noqa: E731
            mean = sum(b.sum(0) for b in blocks()) / len(x)
            std = (sum(((b - mean) ** 2).sum(0) for b in blocks()) / max(1, len(x) - 1)).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))   # a constant feature (dead unit) stays 0, not 0/0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_head(num_features: int, num_classes: int, hidden: list[int], standardize: bool = False) -> nn.Sequential:
    """The practice's head by default: Dense(400, relu) -> Dense(classes); softmax lives in the loss.
    hidden = [] gives a linear head; standardize puts a Standardize layer first, named so that the dense
    layers keep the checkpoint keys they have without it (0.weight, ...)."""
    layers, d = [], num_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    if not standardize:
        return nn.Sequential(*layers)
    return nn.Sequential(OrderedDict([("standardize", Standardize(num_features)),
                                      *((str(i), m) for i, m in enumerate(layers))]))


def _is_file(weights: str) -> bool:
    return weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or Path(weights).expanduser().is_file()


def _offline_error(name: str, e: Exception, why: str = "") -> CnnlabError:
    why = f"; {why}" if why else ""
    return CnnlabError(
        f"[model] weights: cannot get pretrained weights for {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}{why}). "
        f"On a machine with internet they are downloaded and cached on first use; offline, download the weights "
        f"file elsewhere and set [model] weights = '/path/to/file.safetensors' (or .pth), or weights = 'none' for random.")


def _timm_backbone(name: str, weights: str) -> tuple[nn.Module, Normalizer, int]:
    import timm
    from cnnlab.models.hub import prepare_hf_hub
    from cnnlab.models.plugins import failures_hint
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"[model] name = {name!r} is not a cnnlab model, a timm model, 'tv:<torchvision model>' "
                          f"or 'package.module:function'; `cnnlab models` lists cnnlab's{failures_hint()}")
    kwargs: dict = {"num_classes": 0}     # num_classes=0: pooled features, no classifier
    if weights == "none":
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif _is_file(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CnnlabError(f"[model] weights = {weights!r}: file not found")
        model = timm.create_model(name, pretrained=False, **kwargs)
        state = load_state(path)
        # A file saved with the ImageNet classifier: drop it (the dense head replaces it); all else must fit.
        classifier = str(model.pretrained_cfg.get("classifier", "fc"))
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CnnlabError(f"[model] weights = {weights!r} does not fit {name!r}: {str(e).splitlines()[0][:300]} "
                              f"(missing/unexpected keys; is it a state dict of {name}?)") from None
    else:
        full = f"{name.split('.')[0]}.{weights}" if weights else name
        offline = prepare_hf_hub()       # a hub that does not answer: the local cache or this error, at once
        try:
            model = timm.create_model(full, pretrained=True, **kwargs)
        except (RuntimeError, ValueError) as e:
            if "Invalid pretrained tag" in str(e) or "Unknown model" in str(e):
                tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name.split('.')[0]}.*")]
                raise ConfigError(f"[model] weights = {weights!r} is not a pretrained tag of {name!r} "
                                  f"(tags: {', '.join(tags[:12]) or 'none'})") from None
            raise _offline_error(full, e, offline) from None
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise _offline_error(full, e, offline) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, Normalizer(cfg["mean"], cfg["std"]), int(cfg["input_size"][-1])


def _torchvision_backbone(name: str, weights: str) -> tuple[nn.Module, Normalizer, int]:
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise ConfigError(f"[model] name = 'tv:{name}' is not a torchvision model") from None
    w = None
    state = None
    if weights == "":
        w = enum.DEFAULT
    elif weights != "none" and _is_file(weights):
        state = load_state(Path(weights).expanduser())
    elif weights != "none":
        try:
            w = enum[weights]
        except KeyError:
            raise ConfigError(f"[model] weights = {weights!r} is not a weights name of tv:{name} "
                              f"({', '.join(e.name for e in enum)})") from None
    if w is not None:                # urllib waits without a timeout where nothing answers: ask first
        from cnnlab.models.hub import reachable, unreachable_reason
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(w.url).path).name
        if not cached.is_file() and not reachable(w.url):
            raise _offline_error(f"tv:{name}", OSError("not in the local cache"), unreachable_reason(w.url))
    try:
        model = torchvision.models.get_model(name, weights=w)
    except Exception as e:  # noqa: BLE001
        raise _offline_error(f"tv:{name}", e) from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CnnlabError(f"[model] weights = {weights!r} does not fit tv:{name}: {str(e).splitlines()[0][:300]}") from None
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    if w is not None:
        t = w.transforms()
        mean, std, size = tuple(t.mean), tuple(t.std), int(t.crop_size[0])
    return model, Normalizer(mean, std), size


def _custom_backbone(spec: str, weights: str, args: dict) -> tuple[nn.Module, Normalizer | None, int]:
    """Your function's module; its normalizer is None when it declares no mean/std (the caller decides).
    Imports and calls whatever `spec` names: a config from a run folder goes through models.trust first."""
    from cnnlab.models.plugins import call_user_function, load_function
    model = call_user_function(load_function(spec), args, f"[model] name = {spec!r}", weights)
    return (model, *_declared_preprocessing(model, spec))


def _declared_preprocessing(model: nn.Module, spec: str) -> tuple[Normalizer | None, int]:
    """(normalizer or None, input size) from the module's timm-style `pretrained_cfg` dict.

    Weights only work when fed the way they were trained (EfficientNet-Lite: [-1, 1], not ImageNet
    mean/std), and only the code that made the module knows how; timm's attribute is the convention that
    timm's own tools read too. A malformed declaration is an error: guessing would silently hurt accuracy."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    try:
        shape = [int(v) for v in cfg.get("input_size") or (3, 224, 224)]
        mean, std = ([float(v) for v in cfg[k]] if cfg.get(k) is not None else None for k in ("mean", "std"))
        ok = (len(shape) == 3 and min(shape) > 0 and (mean is None or len(mean) == 3)
              and (std is None or (len(std) == 3 and min(std) > 0)))
    except (AttributeError, TypeError, ValueError):     # not a dict, or not numbers
        ok = False
    if not ok:
        raise ConfigError(f"[model] name = {spec!r}: the module's pretrained_cfg must be a dict with mean = 3 numbers, "
                          f"std = 3 positive numbers, input_size = (3, H, W); got {cfg!r}"[:400])
    return (None if mean is None or std is None else Normalizer(mean, std)), shape[-1]


def _override_normalizer(norm: Normalizer | None, name: str, mean: list, std: list) -> Normalizer:
    """[model] mean/std over the backbone's own; ImageNet's, with one warning, where nothing says."""
    if norm is None and not (mean and std):
        warnings.warn(f"[model] name = {name!r} declares no input mean/std: assuming ImageNet's "
                      f"(mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}). If its weights expect other "
                      f"inputs, set a `pretrained_cfg` dict on the module (mean, std, input_size, as timm does) "
                      f"or [model] mean = [...] and std = [...]", PreprocessingWarning, stacklevel=3)
    norm = norm or Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    return Normalizer(list(mean) or norm.mean, list(std) or norm.std)


def create_backbone(name: str, weights: str = "", args: dict | None = None, mean: list | tuple = (),
                    std: list | tuple = ()) -> tuple[nn.Module, int, Normalizer, int]:
    """(feature extractor, feature size, its input normalizer, its input size).

    mean/std ([model] mean/std; empty = not set) replace the backbone's own normalization."""
    if ":" in name and not name.startswith("tv:"):
        model, norm, size = _custom_backbone(name, weights, args or {})
    elif name.startswith("tv:"):
        model, norm, size = _torchvision_backbone(name[3:], weights)
    else:
        model, norm, size = _timm_backbone(name, weights)
    norm = _override_normalizer(norm, name, mean, std)
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            num_features = model(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
        except Exception as e:  # noqa: BLE001 - a custom module's forward is the user's code
            from cnnlab.models.plugins import first_line
            raise ConfigError(f"[model] name = {name!r}: its forward on a (1, 3, {size}, {size}) batch raised "
                              f"{type(e).__name__}: {first_line(e)}") from None
        model.train(was)
    return model, num_features, norm, size


def build_transfer_model(cfg: ModelConfig, num_classes: int) -> tuple[TransferNet, Normalizer, int]:
    backbone, nf, norm, size = create_backbone(cfg.name, cfg.weights, cfg.args, cfg.mean, cfg.std)
    size = cfg.input_size or size
    model = TransferNet(backbone, nf, num_classes, [int(h) for h in cfg.head], cfg.flip_average,
                        cfg.standardize_features)
    return model, norm, size
