"""Batched augmentation with Keras semantics, and featurewise normalization fitted on the train split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnlab.data.augment import Augmenter, cutout, hflip, random_crop, resize, train_side, zoom
from cnnlab.data.preprocess import Normalizer
from cnnlab.config import AugmentConfig, DataConfig
from cnnlab.data import Dataset, split_train_val
from cnnlab.experiments.prepare import prepare_splits


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- horizontal flip

def test_hflip_mirrors_exactly_the_chosen_images():
    x = torch.rand(400, 3, 5, 7, generator=gen(9))
    out = hflip(x, gen(1))
    chosen = torch.rand(400, generator=gen(1)) < 0.5          # the same draw, replayed
    flipped = x.flip(3)
    for i in range(len(x)):
        assert torch.equal(out[i], flipped[i] if chosen[i] else x[i]), i
    # every image is either itself or its mirror, never anything else
    same = (out == x).flatten(1).all(1)
    mirrored = (out == flipped).flatten(1).all(1)
    assert torch.equal(mirrored, chosen) and torch.equal(same, ~chosen)
    assert 150 < int(chosen.sum()) < 250                       # about half


def test_hflip_rate_and_seed():
    x = torch.arange(2000 * 4, dtype=torch.float32).view(2000, 1, 1, 4)
    a = hflip(x, gen(3))
    rate = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.45 < rate < 0.55
    assert torch.equal(a, hflip(x, gen(3)))                    # the seed fixes the flips
    assert not torch.equal(a, hflip(x, gen(4)))


def test_given_flips_mirror_exactly_those_images_with_or_without_random_resized_crop():
    """alternate_flip passes the flips in: plain flip and the flip folded into random_resized_crop obey them."""
    x = torch.rand(6, 3, 8, 8, generator=gen(2))
    mask = torch.tensor([True, False, False, True, True, False])
    want = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    assert torch.equal(hflip(x, gen(1), flip=mask), want)
    # the same crops (same draws), mirrored where the mask says: a mirrored crop is the crop of the mirror
    rrc = Augmenter(AugmentConfig(random_resized_crop=True, rrc_min_scale=0.3, hflip=True, alternate_flip=True))
    crops = rrc(x, gen(1), flip=torch.zeros(6, dtype=torch.bool))
    assert torch.allclose(rrc(x, gen(1), flip=mask), torch.where(mask.view(-1, 1, 1, 1), crops.flip(3), crops), atol=1e-5)
    assert not torch.allclose(crops, x)


# ---------------------------------------------------------------- zoom

def _probe_images(n: int, size: int = 33) -> torch.Tensor:
    """ch0: horizontal ramp 0..1, ch1: vertical ramp 0..1, ch2: a centred bright square."""
    r = torch.linspace(0, 1, size)
    x = torch.zeros(n, 3, size, size)
    x[:, 0] = r.view(1, 1, size)
    x[:, 1] = r.view(1, size, 1)
    c, h = size // 2, size // 6
    x[:, 2, c - h:c + h + 1, c - h:c + h + 1] = 1.0
    return x


def _factors(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom factors recovered from the ramps: output slope at the centre / input slope."""
    size = out.shape[-1]
    c = size // 2
    step = 1.0 / (size - 1)
    fx = (out[:, 0, c, c + 1] - out[:, 0, c, c - 1]) / (2 * step)
    fy = (out[:, 1, c + 1, c] - out[:, 1, c - 1, c]) / (2 * step)
    return fx, fy


def test_zoom_tiny_range_is_identity():
    x = torch.rand(16, 3, 32, 32, generator=gen(0))
    out = zoom(x, 1e-6, gen(1))
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-4)


def test_zoom_factors_lie_in_range_and_are_independent():
    z = 0.3
    n = 300
    x = _probe_images(n)
    out = zoom(x, z, gen(5))
    fx, fy = _factors(out)
    assert fx.min() >= 1 - z - 1e-3 and fx.max() <= 1 + z + 1e-3
    assert fy.min() >= 1 - z - 1e-3 and fy.max() <= 1 + z + 1e-3
    # spread over the whole range, not one factor for the batch
    assert fx.min() < 1 - 0.8 * z and fx.max() > 1 + 0.8 * z
    assert fy.min() < 1 - 0.8 * z and fy.max() > 1 + 0.8 * z
    # x and y drawn independently (Keras draws zx, zy separately)
    assert abs(np.corrcoef(fx.numpy(), fy.numpy())[0, 1]) < 0.3
    assert (fx - fy).abs().max() > 0.1
    # the factors are those drawn from the generator: U[1-z, 1+z] for (x, y) per image
    drawn = torch.empty(n, 2).uniform_(1 - z, 1 + z, generator=gen(5))
    assert torch.allclose(fx, drawn[:, 0], atol=1e-3) and torch.allclose(fy, drawn[:, 1], atol=1e-3)


def test_zoom_factor_above_one_shrinks_content():
    """Keras: a factor > 1 samples a larger area, so the content gets smaller (and < 1 magnifies)."""
    size = 33
    x = _probe_images(400, size)
    out = zoom(x, 0.5, gen(11))
    fx, fy = _factors(out)
    width_in = int((x[0, 2, size // 2] > 0.5).sum())
    widths = (out[:, 2, size // 2] > 0.5).sum(1)
    heights = (out[:, 2, :, size // 2] > 0.5).sum(1)
    big = fx > 1.25
    small = fx < 0.75
    assert big.sum() > 10 and small.sum() > 10
    assert (widths[big] < width_in).all()
    assert (widths[small] > width_in).all()
    assert (heights[fy > 1.25] < width_in).all() and (heights[fy < 0.75] > width_in).all()
    # the square's width scales like 1/factor
    assert torch.allclose(widths.float() * fx, torch.full_like(fx, width_in), atol=2.5)
    # the ramp: content moves toward the centre, so the right-hand pixels reach 1 only when zooming out
    assert torch.allclose(out[big, 0, size // 2, -1], torch.ones(int(big.sum())), atol=1e-5)
    assert (out[small, 0, size // 2, -1] < 0.95).all()


def test_zoom_out_fills_with_nearest_border():
    size = 32
    x = torch.full((200, 3, size, size), 0.8)
    x[:, :, 10:22, 10:22] = 0.2
    out = zoom(x, 0.5, gen(2))
    assert out.min() >= 0.2 - 1e-5 and out.max() <= 0.8 + 1e-5
    assert not (out < 0.1).any()                                   # zero padding would leave black borders
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, torch.full_like(corners, 0.8), atol=1e-5)


# ---------------------------------------------------------------- random crop

def test_random_crop_is_a_window_of_the_reflect_padded_image():
    n, c, h, w, pad = 40, 3, 9, 11, 3
    x = torch.rand(n, c, h, w, generator=gen(0))
    out = random_crop(x, pad, gen(1))
    assert out.shape == x.shape
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    offsets = set()
    for i in range(n):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(out[i].numpy(), xp[i, :, dy:dy + h, dx:dx + w])]
        assert len(hits) == 1, (i, hits)
        offsets.add(hits[0])
    assert len(offsets) > 10                                     # offsets vary per image
    assert torch.equal(out, random_crop(x, pad, gen(1)))


def test_cutout_zeroes_one_square_per_image_clipped_at_the_edges():
    n, size = 200, 4
    x = torch.rand(n, 3, 10, 10, generator=gen(0)) + 1             # no zeros of its own
    out = cutout(x, size, gen(1))
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 2])                       # the same square in every channel
    assert torch.equal(out[~zero], x[~zero])                         # everything else untouched
    areas = set()
    for i in range(n):
        rows, cols = zero[i, 0].any(1).nonzero().flatten(), zero[i, 0].any(0).nonzero().flatten()
        assert len(rows) <= size and len(cols) <= size and len(rows) * len(cols) == zero[i, 0].sum()  # a rectangle
        assert rows.tolist() == list(range(rows[0], rows[-1] + 1))
        areas.add(len(rows) * len(cols))
    assert size * size in areas and min(areas) < size * size        # whole squares, and squares cut by an edge
    assert torch.equal(out, cutout(x, size, gen(1)))                 # the seed fixes it
    # A process holding part of the global batch cuts what one process would have cut there.
    torch.testing.assert_close(cutout(x[50:100], size, gen(1), n_draw=n, part=slice(50, 100)), out[50:100])


def test_augmenter_applies_the_config():
    x = _probe_images(8)
    assert not Augmenter(AugmentConfig()).active
    assert torch.equal(Augmenter(AugmentConfig())(x, gen()), x)
    aug = Augmenter(AugmentConfig(hflip=True, zoom=0.2, crop_padding=2))
    assert aug.active and Augmenter(AugmentConfig(cutout=4)).active
    out = aug(x, gen(0))
    assert out.shape == x.shape and not torch.equal(out, x)


# ---------------------------------------------------------------- progressive resizing

def test_progressive_side_grows_linearly_in_multiples_of_8_to_full_size():
    cfg = AugmentConfig(resize_from=16, resize_until=25)
    assert [train_side(cfg, e, 32) for e in range(40)] == [16] * 12 + [24] * 12 + [32] * 16
    # Large images: every step a multiple of 8, full size from epoch resize_until (1-based) on.
    sides = [train_side(AugmentConfig(resize_from=128, resize_until=5), e, 224) for e in range(6)]
    assert sides == [128, 152, 176, 200, 224, 224]
    assert all(train_side(AugmentConfig(), e, 32) == 32 for e in range(5))                 # off
    assert train_side(AugmentConfig(resize_from=48, resize_until=5), 0, 32) == 32          # never enlarges


def test_resize_averages_instead_of_aliasing():
    """Shrinking a 1-pixel checkerboard (+-1) to 24 px: antialiased, each pixel is close to its mean 0; sampled
    without antialiasing it keeps stripes of +-0.44 (moire). A constant image stays that constant."""
    board = ((torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2 * 2.0 - 1.0).expand(2, 3, 32, 32)
    small = resize(board, 24)
    assert small.shape == (2, 3, 24, 24)
    assert small[..., 1:-1, 1:-1].abs().max() < 0.1                                   # inside the border
    assert F.interpolate(board, size=24, mode="bilinear").abs().max() > 0.4          # what aliasing looks like
    torch.testing.assert_close(resize(torch.full((1, 3, 32, 32), 0.7), 16), torch.full((1, 3, 16, 16), 0.7))


def test_progressive_resizing_needs_the_epoch_it_ends():
    from cnnlab.config import from_dict
    from cnnlab.errors import ConfigError
    with pytest.raises(ConfigError, match="resize_until"):
        from_dict({"augment": {"resize_from": 16}})
    with pytest.raises(ConfigError, match="resize_from"):
        from_dict({"augment": {"resize_from": -8, "resize_until": 3}})
    with pytest.raises(ConfigError, match="resize_from.*frozen-backbone"):
        from_dict({"augment": {"resize_from": 16, "resize_until": 3}, "train": {"freeze_backbone": True}})


# ---------------------------------------------------------------- normalization

def test_normalizer_fit_matches_numpy():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8))
    x[:, 1] //= 3               # different statistics per channel
    norm = Normalizer.fit(x, chunk=7)                     # chunks must not change the result
    xf = x.numpy().astype(np.float64) / 255.0
    assert np.allclose(norm.mean.numpy(), xf.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(norm.std.numpy(), xf.std(axis=(0, 2, 3)), atol=1e-6)
    out = norm(x)
    assert out.dtype == torch.float32
    expected = (xf - xf.mean(axis=(0, 2, 3)).reshape(1, 3, 1, 1)) / (xf.std(axis=(0, 2, 3)).reshape(1, 3, 1, 1) + 1e-6)
    assert np.allclose(out.numpy(), expected, atol=1e-4)
    assert np.allclose(out.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert np.allclose(out.numpy().std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_unfitted_normalizer_scales_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert torch.allclose(Normalizer()(x)[0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))


@pytest.mark.parametrize("val_split", ["last", "first", "stratified"])
def test_featurewise_normalizer_is_fitted_on_the_train_split_only(val_split):
    n = 100
    y = torch.arange(n) % 5
    x = torch.full((n, 3, 4, 4), 40, dtype=torch.uint8)
    x[:, 1] = 90
    # mark the validation images of this split and make them very different (bright)
    tr, va = split_train_val(y, 0.2, val_split, 7)
    x[va] = 250
    x[tr[::2], 2] = 10                      # some variation inside the train split
    x_test = torch.full((30, 3, 4, 4), 255, dtype=torch.uint8)
    ds = Dataset(x, y, x_test, torch.arange(30) % 5, [str(i) for i in range(5)], "t")
    splits, pre = prepare_splits(ds, DataConfig(val_fraction=0.2, val_split=val_split), "featurewise", 7,
                                 torch.device("cpu"))
    assert len(splits.train) == 80 and len(splits.val) == 20
    assert (splits.val.x == 250).all()      # the split we marked is the one held out
    train_x = x[tr].numpy().astype(np.float64) / 255
    assert np.allclose(np.array(pre.mean), train_x.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(np.array(pre.std), train_x.std(axis=(0, 2, 3)), atol=1e-6)
    assert pre.mean[0] == pytest.approx(40 / 255, abs=1e-6)
    # not fitted on everything
    all_x = torch.cat([x, x_test]).numpy().astype(np.float64) / 255
    assert abs(pre.mean[0] - all_x[:, 0].mean()) > 0.1


def test_no_normalization_keeps_plain_scaling():
    ds = Dataset(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10) % 2,
                 torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"])
    splits, pre = prepare_splits(ds, DataConfig(val_fraction=0.2), "none", 0, torch.device("cpu"))
    assert pre.mean is None and pre.std is None
    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 4
