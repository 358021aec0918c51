"""What a model is made of, said by the model itself: a pretrained backbone with a head, or one network.

The run treats the two differently (only a backbone model can be frozen, have head-only epochs, a linear probe,
a lower backbone learning rate), and asks the model, not its attribute names.
"""
from __future__ import annotations

from torch import nn


class BackboneModel(nn.Module):
    """A network made of `backbone` (images -> pooled features) and `head` (features -> logits); subclasses set
    both in __init__. `flip_average`: the features are the mean of the image's and its mirror's."""
    backbone: nn.Module
    head: nn.Module
    flip_average: bool = False

    def set_backbone_trainable(self, trainable: bool) -> None:
        self.backbone.requires_grad_(trainable)


def is_backbone_model(model: nn.Module) -> bool:
    return isinstance(model, BackboneModel)
