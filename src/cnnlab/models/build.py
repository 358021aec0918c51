"""From a [model] table to a ready nn.Module: registered models, or backbones with a dense head."""
from __future__ import annotations

import torch
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


class FlipAverage(nn.Module):
    """Test-time flip ([augment] test_flip): in eval mode, the mean of the logits of the image and of its
    mirror; in training mode, the wrapped model as it is. Holds no weights of its own: checkpoints stay those
    of the wrapped model."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.net(x)
        # Two calls, not one on both views stacked: evaluation memory stays that of one batch.
        return (self.net(x) + self.net(x.flip(-1))) / 2


def inference_model(model: nn.Module, test_flip: bool) -> nn.Module:
    """The module that scores and predicts: the model, or the model averaged over the image and its mirror."""
    return FlipAverage(model) if test_flip else model
