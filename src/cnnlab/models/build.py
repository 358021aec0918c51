"""From a [model] table to a ready nn.Module: registered models, or backbones with a dense head."""
from __future__ import annotations

from torch import nn

from cnnlab.augment import Normalizer
from cnnlab.config import ModelConfig, TrainConfig
from cnnlab.models import create_model, is_registered


def build_model(cfg: ModelConfig, num_classes: int, input_size: int, train: TrainConfig) -> tuple[nn.Module, Normalizer | None, int]:
    """Returns (model, the backbone's own input normalizer or None, the image size the model sees)."""
    if is_registered(cfg.name):
        return create_model(cfg.name, num_classes, **cfg.args), None, input_size
    from cnnlab.models.backbones import build_transfer_model
    return build_transfer_model(cfg, num_classes, input_size, train)
