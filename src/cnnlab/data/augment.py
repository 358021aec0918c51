"""Batched image preprocessing and augmentation, on whole uint8 batches on the training device.

No per-image Python: each transform draws its random numbers for the whole batch from one generator
(so the seed fixes every augmentation), then applies them with a single tensor op. Under torchrun a
process holds only its part of the global batch: it draws the numbers of the whole global batch (`n`)
and applies those of its part (`part`), so every image gets the numbers it gets on one process.

Keras semantics where the practice used Keras (ImageDataGenerator):
- zoom_range=z: zoom factors for x and y drawn independently from U[1-z, 1+z]; a factor > 1 samples a
  larger area (the image shrinks), < 1 magnifies. Bilinear interpolation (Keras's interpolation_order=1)
  and fill_mode='nearest' (edge pixels repeated) -> grid_sample(bilinear, padding_mode='border').
- horizontal_flip: each image mirrored with probability 0.5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnlab.config import AugmentConfig


Draw = tuple[int, slice]        # (global batch size, the part of it this batch holds)


def hflip(x: torch.Tensor, gen: torch.Generator, n_draw: int | None = None, part: slice = slice(None),
          flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image mirrored with probability 0.5; `flip` (bool, one per image): mirror exactly those instead."""
    if flip is None:
        flip = (torch.rand(n_draw or len(x), generator=gen, device=gen.device) < 0.5)[part]
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def alternating_flips(base: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's derandomized flip: `base` is a fixed random half of the images (bool, one per image); they
    are mirrored in even epochs (0-based) and the other half in odd ones, so every image is seen both ways in
    any two consecutive epochs, where random flips show about half of them the same way twice."""
    return base ^ bool(epoch % 2)


def zoom(x: torch.Tensor, z: float, gen: torch.Generator, n_draw: int | None = None,
         part: slice = slice(None)) -> torch.Tensor:
    """Keras zoom_range=z on a float batch: independent x/y factors in [1-z, 1+z], centred, edge fill."""
    n = len(x)
    f = torch.empty(n_draw or n, 2, device=gen.device).uniform_(1 - z, 1 + z, generator=gen)[part].to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = f[:, 0]
    theta[:, 1, 1] = f[:, 1]
    # align_corners=True: -1/+1 are the centres of the edge pixels, as in Keras's centred affine transform.
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, n_draw: int | None = None,
                part: slice = slice(None)) -> torch.Tensor:
    """Reflect-pad by `pad` then crop back at a random offset per image (one gather for the batch)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    off = torch.randint(0, 2 * pad + 1, (n_draw or n, 2), generator=gen, device=gen.device)[part].to(x.device)
    rows = (off[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (off[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator, n_draw: int | None = None,
           part: slice = slice(None)) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): a size x size square at a random centre in each image set to 0 (the
    mean, on normalized inputs); near an edge the square is cut off by it. One mask for the whole batch."""
    n, _, h, w = x.shape
    centre = torch.stack([torch.randint(0, h, (n_draw or n,), generator=gen, device=gen.device),
                          torch.randint(0, w, (n_draw or n,), generator=gen, device=gen.device)], 1)
    top_left = (centre[part].to(x.device) - size // 2).view(n, 2, 1)
    rows = torch.arange(h, device=x.device) - top_left[:, 0]          # (n, h): position inside the square
    cols = torch.arange(w, device=x.device) - top_left[:, 1]
    inside = ((rows >= 0) & (rows < size)).view(n, 1, h, 1) & ((cols >= 0) & (cols < size)).view(n, 1, 1, w)
    return x.masked_fill(inside, 0.0)


def random_resized_crop(x: torch.Tensor, out: int, min_scale: float, gen: torch.Generator,
                        flip: bool = False, n_draw: int | None = None, part: slice = slice(None),
                        flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inception-style crop (area in [min_scale, 1], aspect in [3/4, 4/3]) resized to out x out, batched,
    with an optional random horizontal flip folded into the same affine sample (`flip_mask`: mirror exactly
    the images it marks, this part's, instead of drawing)."""
    n = n_draw or len(x)
    dev = gen.device
    area = torch.empty(n, device=dev).uniform_(min_scale, 1.0, generator=gen)
    logr = torch.empty(n, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = logr.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)          # crop width / image width
    sh = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * (1 - sh)
    sign = torch.where(torch.rand(n, device=dev, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    theta = theta[part].to(device=x.device, dtype=x.dtype)
    if flip_mask is not None:
        theta[:, 0, 0] = theta[:, 0, 0].abs() * torch.where(flip_mask.to(x.device), -1.0, 1.0).to(theta.dtype)
    grid = F.affine_grid(theta, [len(x), x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def train_side(cfg: AugmentConfig, epoch: int, full: int) -> int:
    """Progressive resizing: the side of the training images at `epoch` (0-based) when their full side is
    `full`: resize_from at the first epoch, growing linearly to `full` at epoch resize_until (1-based), rounded
    down to a multiple of 8 pixels (never below resize_from), full size from then on."""
    if not cfg.resize_from or cfg.resize_from >= full or epoch + 1 >= cfg.resize_until:
        return full
    side = cfg.resize_from + (full - cfg.resize_from) * epoch / max(1, cfg.resize_until - 1)
    return min(full, max(cfg.resize_from, int(side) // 8 * 8))


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """A float batch shrunk to side x side: bilinear with antialiasing (a box-like filter when shrinking, so
    small images keep what the full-size ones show instead of aliasing)."""
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


class Augmenter:
    """The training-time transform of a config's [augment] table, applied to a float batch."""

    def __init__(self, cfg: AugmentConfig, out_size: int | None = None):
        self.cfg = cfg
        self.out_size = out_size

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.zoom or c.hflip or c.crop_padding or c.random_resized_crop or c.cutout)

    def __call__(self, x: torch.Tensor, gen: torch.Generator, draw: Draw | None = None,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
        """`draw`: (global batch size, x's part of it) when x is one process's shard; None: x is the batch.
        `flip`: which images of x to mirror (alternating flips), instead of drawing at random."""
        c = self.cfg
        n, part = draw or (len(x), slice(None))
        if c.random_resized_crop:
            x = random_resized_crop(x, self.out_size or x.shape[-1], c.rrc_min_scale, gen, c.hflip, n, part, flip)
            return cutout(x, c.cutout, gen, n, part) if c.cutout else x
        if c.crop_padding:
            x = random_crop(x, c.crop_padding, gen, n, part)
        if c.zoom:
            x = zoom(x, c.zoom, gen, n, part)
        if c.hflip:
            x = hflip(x, gen, n, part, flip)
        if c.cutout:
            x = cutout(x, c.cutout, gen, n, part)
        return x
