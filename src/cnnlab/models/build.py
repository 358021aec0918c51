"""From a [model] table to a ready nn.Module: registered models, or backbones with a dense head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError
from cnnlab.models import create_model, is_registered
from cnnlab.data.preprocess import Normalizer


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> tuple[nn.Module, Normalizer | None, int]:
    """Returns (model, the backbone's own input normalizer or None, the image size the model sees).

    cnnlab's registered models see the stored images as they are (image_size); a backbone sees
    [model] input_size, else its weights' own input size. A [model] layers list is built as written, and fed
    as the registered models are."""
    if cfg.layers:
        from cnnlab.models.layers import build_layers
        return build_layers(cfg.layers, num_classes, image_size), None, image_size
    if cfg.module:                        # its @register_model nets, before the name is looked up
        from cnnlab.models.plugins import import_module
        import_module(cfg.module)
    if is_registered(cfg.name):
        if cfg.kind == "backbone":
            raise ConfigError(f"[model] kind = 'backbone': {cfg.name!r} is a registered net, a whole classifier; "
                              f"kind applies to package.module:function (remove it)")
        if "image_size" in cfg.args:      # the data's size is what the model sees; a second one would disagree
            raise ConfigError(f"[model.args] image_size: {cfg.name!r} is built for the images' own size; "
                              f"remove it and set [data] image_size instead")
        return create_model(cfg.name, num_classes, image_size, **cfg.args), None, image_size
    from cnnlab.models.trust import is_code
    if is_code(cfg.name):                 # a whole classifier is built and fed as a registered net (models/custom.py)
        from cnnlab.models.custom import build_code_classifier, code_kind
        from cnnlab.models.plugins import load_function
        fn = load_function(cfg.name)
        if code_kind(cfg, fn) == "classifier":
            return build_code_classifier(cfg, fn, num_classes, image_size), None, image_size
    elif cfg.kind == "classifier":
        raise ConfigError(f"[model] kind = 'classifier' is for package.module:function; {cfg.name!r} is a timm or "
                          f"torchvision backbone (cnnlab puts a dense head on it): remove kind")
    from cnnlab.models.backbones import build_transfer_model
    return build_transfer_model(cfg, num_classes)


class TestTimeAverage(nn.Module):
    """Test-time augmentation ([augment] test_flip, test_shift): in eval mode, the mean of the logits of the
    image and its mirror, and with `shift`, of both views moved diagonally by +-shift pixels (reflect
    padding; airbench's multi-crop TTA). In training mode, the wrapped model as it is. Holds no weights of
    its own: checkpoints stay those of the wrapped model."""

    def __init__(self, net: nn.Module, flip: bool = True, shift: int = 0):
        super().__init__()
        self.net, self.flip, self.shift = net, flip, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.net(x)
        views = [x]
        if self.shift:
            s, (h, w) = self.shift, x.shape[-2:]
            padded = F.pad(x, (s, s, s, s), mode="reflect")
            views += [padded[..., :h, :w], padded[..., 2 * s:2 * s + h, 2 * s:2 * s + w]]
        # One call per view, not one on all views stacked: evaluation memory stays that of one batch.
        total = 0
        for v in views:
            total = total + self.net(v)
            if self.flip:
                total = total + self.net(v.flip(-1))
        return total / (len(views) * (2 if self.flip else 1))


def inference_model(model: nn.Module, test_flip: bool, test_shift: int = 0) -> nn.Module:
    """The module that scores and predicts: the model, or its average over test-time views."""
    return TestTimeAverage(model, test_flip, test_shift) if test_flip or test_shift else model
