"""From a [model] table to a ready nn.Module: registered models, or backbones with a dense head."""
from __future__ import annotations

from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.models import create_model, is_registered
from cnnlab.preprocess import Normalizer


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> tuple[nn.Module, Normalizer | None, int]:
    """Returns (model, the backbone's own input normalizer or None, the image size the model sees).

    cnnlab's registered models see the stored images as they are (image_size); a backbone sees
    [model] input_size, else its weights' own input size."""
    if is_registered(cfg.name):
        return create_model(cfg.name, num_classes, **cfg.args), None, image_size
    from cnnlab.models.backbones import build_transfer_model
    return build_transfer_model(cfg, num_classes)
