"""What turns stored uint8 images into network inputs, at evaluation and prediction time.

A run records one `Preprocess` (preprocess.json in its run folder) so that a later command, or a
user's own code, feeds new images exactly as the network saw its test images:

  1. a new image file is converted to RGB, resized so its shorter side is `image_size` and
     centre-cropped to image_size x image_size (what the data source did when it decoded the data set);
  2. x / 255, then (x - mean) / (std + 1e-6) per channel when mean/std are set (featurewise statistics
     of the training split, or the backbone's own ImageNet-style constants);
  3. when image_size != input_size: the central `eval_crop` of the image, resized to input_size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


class Normalizer:
    """Maps uint8 batches to float: x/255, then (x - mean) / (std + 1e-6) when fitted or given."""

    def __init__(self, mean=None, std=None):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def fit(cls, x_uint8: torch.Tensor, chunk: int = 4096) -> "Normalizer":
        """Per-channel mean and std of x/255 over all pixels (float64 sums, chunked to bound memory).
        x may be streamed (cnnlab.data.stream.Rows, read by slices); under torchrun each process reads
        every world-th chunk and the sums are added up across processes."""
        from cnnlab.runtime import distributed
        rank, world = distributed.info().rank, distributed.info().world
        s = torch.zeros(3, dtype=torch.float64)
        s2 = torch.zeros(3, dtype=torch.float64)
        for i in range(rank * chunk, len(x_uint8), world * chunk):
            b = x_uint8[i:i + chunk].to(torch.float64) / 255.0
            s += b.sum(dim=(0, 2, 3)).cpu()
            s2 += (b * b).sum(dim=(0, 2, 3)).cpu()
        distributed.all_reduce_sum(s, s2)
        n = len(x_uint8) * x_uint8.shape[2] * x_uint8.shape[3]
        mean = s / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt()
        return cls(mean.float(), std.float())

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.float().div_(255.0)
        if self.mean is not None:
            mean = self.mean.to(x.device).view(1, -1, 1, 1)
            std = self.std.to(x.device).view(1, -1, 1, 1)
            x = (x - mean) / (std + 1e-6)
        return x

    def state_dict(self) -> dict:
        return {"mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}


def center_crop(x: torch.Tensor, fraction: float, out: int) -> torch.Tensor:
    """Evaluation view of a large image: the central `fraction` of it, resized to out x out."""
    h = x.shape[2]
    c = max(1, round(h * fraction))
    top = (h - c) // 2
    x = x[:, :, top:top + c, top:top + c]
    if c != out:
        x = F.interpolate(x, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class Preprocess:
    """The recorded input pipeline of a run (see the module docstring)."""
    image_size: int                     # stored images are image_size x image_size (CIFAR: 32; CUB: 256)
    input_size: int                     # what the network sees (CIFAR: 32; ResNet50: 224)
    eval_crop: float = 1.0              # central fraction used when image_size != input_size
    mean: list[float] | None = None     # None: x / 255 only
    std: list[float] | None = None

    @classmethod
    def from_normalizer(cls, norm: Normalizer, image_size: int, input_size: int, eval_crop: float) -> "Preprocess":
        st = norm.state_dict()
        return cls(int(image_size), int(input_size), float(eval_crop), st["mean"], st["std"])

    def normalizer(self) -> Normalizer:
        return Normalizer(self.mean, self.std)

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, image_size, image_size) -> float network input (N, 3, input_size, input_size)."""
        x = self.normalizer()(x_uint8)
        if x.shape[-1] != self.input_size:
            x = center_crop(x, self.eval_crop, self.input_size)
        return x

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), int(d["input_size"]), float(d.get("eval_crop", 1.0)), d.get("mean"), d.get("std"))
