"""What turns stored uint8 images into network inputs, at evaluation and prediction time.

A run records one `Preprocess` (preprocess.json in its run folder) so that a later command, or a
user's own code, feeds new images exactly as the network saw its test images:

  1. a new image file is converted to RGB, resized so its shorter side is `image_size` and
     centre-cropped to image_size x image_size (what the data source did when it decoded the data set);
  2. x / 255, then (x - mean) / (std + 1e-6) per channel when mean/std are set (featurewise statistics
     of the training split, or the backbone's own ImageNet-style constants);
  3. when image_size != input_size: the central `eval_crop` of the image, resized to input_size;
  4. channels-last memory layout (unless the run turned [train] channels_last off).

This is the one definition: the training loop's evaluation, feature extraction, `cnnlab evaluate`, predict,
`cnnlab.load(...)`, and export all call `Preprocess.__call__` (training adds its augmentation between steps 2
and 3), and batch with `eval_batch_size`. Same images in, same numbers out, whichever door they came through.
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
        return normalize(x_uint8, self.mean, self.std)

    def state_dict(self) -> dict:
        return {"mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """x/255, then (x - mean) / (std + 1e-6) per channel: the arithmetic, in one place (the exported model's
    first layer calls it too, with mean/std as buffers inside the file)."""
    x = x_uint8.float().div_(255.0)
    if mean is not None:
        x = (x - mean.to(x.device).view(1, -1, 1, 1)) / (std.to(x.device).view(1, -1, 1, 1) + 1e-6)
    return x


def center_crop(x: torch.Tensor, fraction: float, out: int) -> torch.Tensor:
    """Evaluation view of a large image: the central `fraction` of it, resized to out x out."""
    h = x.shape[2]
    c = max(1, round(h * fraction))
    top = (h - c) // 2
    x = x[:, :, top:top + c, top:top + c]
    if c != out:
        x = F.interpolate(x, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
    return x


def layout(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Step 4: the memory layout the network runs in (channels-last: oneDNN's and cuDNN's fast convolutions)."""
    if x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def eval_batch_size(eval_batch: int, train_batch: int, side: int) -> int:
    """Images per evaluation batch: [train] eval_batch_size counts 32x32 images, larger inputs get proportionally
    fewer, never fewer than the training batch (side 0: features, counted as they are). Evaluation memory is
    activations x batch: ResNet50 at 224 with 500 images a batch peaked at 9 GB (benchmarks/memory.py), with 32
    at the training batch's level. One rule for every path, so that every path groups images the same way."""
    if side:
        eval_batch = max(min(eval_batch, train_batch), eval_batch * 32 * 32 // (side * side))
    return max(1, eval_batch)


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

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: uint8 -> float, x/255 and the recorded mean/std."""
        return self.normalizer()(x_uint8)

    def to_input_size(self, x: torch.Tensor) -> torch.Tensor:
        """Step 3: the central eval_crop resized to input_size, when the stored images are another size
        (input_size 0: as they are)."""
        if self.input_size and x.shape[-1] != self.input_size:
            x = center_crop(x, self.eval_crop, self.input_size)
        return x

    def __call__(self, x_uint8: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        """uint8 (N, 3, image_size, image_size) -> float network input (N, 3, input_size, input_size)."""
        return layout(self.to_input_size(self.normalize(x_uint8)), channels_last)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), int(d["input_size"]), float(d.get("eval_crop", 1.0)), d.get("mean"), d.get("std"))
