"""The practice's CIFAR models, layer for layer as the seed wrote them in Keras, and cnnlab's own `resnet9s`.

One reordering, for speed only: where the seed has ReLU then MaxPooling, we pool first. ReLU is monotonic,
so max(relu(x)) == relu(max(x)) exactly (outputs and gradients, up to ties), and ReLU then touches 4x
fewer values: 1.6x faster training of BaseNet on a 2-core CPU. BatchNorm after ReLU (2.4.2) does not
commute with pooling (its scale may be negative), so that variant keeps the seed's order.

Keras counts BatchNormalization's moving mean and variance as (non-trainable) parameters; PyTorch keeps
them as buffers. `keras_param_count` adds them back so the numbers match Keras's model.summary().
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.errors import ConfigError
from cnnlab.models import keras_init_, mean_probability_logits, register_model


def keras_batchnorm(n: int, dims: int = 2) -> nn.Module:
    """BatchNormalization with Keras's defaults: momentum 0.99 (PyTorch counts 1 - 0.99), epsilon 1e-3."""
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(n, eps=1e-3, momentum=0.01)


def _side_after(layer: nn.Module, n: int) -> int:
    """The side of a square n x n input after `layer` (PyTorch's output-size formula), without running it."""
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)) and not getattr(layer, "ceil_mode", False):
        if layer.padding == "same":
            return n
        first = lambda v: v[0] if isinstance(v, tuple) else v      # noqa: E731  (square kernels here)
        k, st, d = first(layer.kernel_size), first(layer.stride), first(layer.dilation)
        p = 0 if layer.padding == "valid" else first(layer.padding)
        span = n + 2 * p - d * (k - 1) - 1
        return span // st + 1 if span >= 0 else 0
    if isinstance(layer, (nn.ReLU, nn.modules.batchnorm._BatchNorm)):
        return n
    raise TypeError(f"_side_after: no output-size rule for {type(layer).__name__}")


def _dense_inputs(features: list[nn.Module], image_size: int, name: str) -> int:
    """What Keras's Flatten() hands the first Dense layer for image_size x image_size inputs: channels x side^2.

    Arithmetic, not a forward pass: nothing runs and no random numbers are drawn, so the layers built after
    it (and keras_init_) see the same RNG stream at every size. An input that some layer shrinks to nothing
    is a ConfigError naming that layer and the smallest size that works."""
    def first_empty(n: int) -> tuple[int, int] | None:
        for i, layer in enumerate(features):
            n = _side_after(layer, n)
            if n < 1:
                return i, n
        return None

    n = int(image_size)
    if (empty := first_empty(n)) is not None:
        i, side = empty
        smallest = next(s for s in range(n + 1, 1 << 16) if first_empty(s) is None)
        raise ConfigError(f"{n}x{n} images are too small for {name}: layer {i} ({type(features[i]).__name__}) "
                          f"would make them {max(side, 0)}x{max(side, 0)}; use [data] image_size >= {smallest}")
    for layer in features:
        n = _side_after(layer, n)
    channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
    return channels * n * n


@register_model
def basenet(num_classes: int = 25, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The seed's BaseNet: conv5(6)-pool-conv5(16)-pool-dense(50)-dense(classes); 24,197 params for 25 classes.

    That count is at 32x32 (the first dense layer has 16 x 5 x 5 inputs); like Keras's Flatten-Dense, the
    dense layer is sized from `image_size` (build_model passes the data's)."""
    features = [
        nn.Conv2d(in_channels, 6, 5), nn.MaxPool2d(2), nn.ReLU(),     # = ReLU then pool (see module doc)
        nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU()]
    model = nn.Sequential(
        *features, nn.Flatten(), nn.Linear(_dense_inputs(features, image_size, "basenet"), 50), nn.ReLU(),
        nn.Linear(50, num_classes))
    return keras_init_(model)


def _deep(num_classes: int, bn: str | None, image_size: int, name: str) -> nn.Module:
    """The seed's deeper net (ejercicio 2.3); bn = 'pre' puts BatchNorm before ReLU (2.4.1), 'post' after (2.4.2).

    The first dense layer is sized from `image_size` (32 x 5 x 5 inputs at 32x32), as Keras's Flatten-Dense."""
    def act(n: int, dims: int = 2) -> list[nn.Module]:
        if bn == "pre":
            return [keras_batchnorm(n, dims), nn.ReLU()]
        if bn == "post":
            return [nn.ReLU(), keras_batchnorm(n, dims)]
        return [nn.ReLU()]

    def act_pool(n: int) -> list[nn.Module]:
        """act(n) followed by MaxPool2d(2); pooled before the ReLU where that is exact (see module doc)."""
        layers = act(n)
        if isinstance(layers[-1], nn.ReLU):
            return layers[:-1] + [nn.MaxPool2d(2), nn.ReLU()]
        return layers + [nn.MaxPool2d(2)]

    features = [
        nn.Conv2d(3, 6, 5), *act(6),                          # 32 -> 28
        nn.Conv2d(6, 16, 3, padding=1), *act_pool(16),        # -> 14
        nn.Conv2d(16, 16, 3, padding=1), *act(16),
        nn.Conv2d(16, 24, 3, padding=1), *act(24),
        nn.Conv2d(24, 32, 5), *act_pool(32)]                  # -> 10 -> 5
    model = nn.Sequential(
        *features, nn.Flatten(),
        nn.Linear(_dense_inputs(features, image_size, name), 100), *act(100, 1),
        nn.Linear(100, 50), *act(50, 1),
        nn.Linear(50, num_classes))
    return keras_init_(model)


@register_model
def deepnet(num_classes: int = 25, image_size: int = 32) -> nn.Module:
    """The seed's deeper net (2.3): five convolutions, two pools, dense 100-50-classes."""
    return _deep(num_classes, None, image_size, "deepnet")


@register_model
def deepnet_bn_pre(num_classes: int = 25, image_size: int = 32) -> nn.Module:
    """The deeper net with BatchNorm before each ReLU (2.4.1)."""
    return _deep(num_classes, "pre", image_size, "deepnet_bn_pre")


@register_model
def deepnet_bn_post(num_classes: int = 25, image_size: int = 32) -> nn.Module:
    """The deeper net with BatchNorm after each ReLU (2.4.2)."""
    return _deep(num_classes, "post", image_size, "deepnet_bn_post")


def _conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, groups=groups), nn.BatchNorm2d(cout), nn.GELU())


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


@register_model
def resnet9s(num_classes: int = 10, width: int = 32) -> nn.Module:
    """cnnlab's small-data net (airbench/ResNet-9 style): 3 conv-pool stages, residual blocks; 1,652,192 params for 25 classes.

    That count is at the default width 32 (what `cnnlab models` shows); `best` uses width 16: 415,984.
    """
    w1, w2, w3 = width * 2, width * 4, width * 8
    return nn.Sequential(
        _conv_bn(3, width),
        _conv_bn(width, w1), nn.MaxPool2d(2), _Residual(w1),       # 32 -> 16
        _conv_bn(w1, w2), nn.MaxPool2d(2),                          # -> 8
        _conv_bn(w2, w3), nn.MaxPool2d(2), _Residual(w3),           # -> 4
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes, bias=False))


def keras_param_count(model: nn.Module) -> int:
    """Parameters as Keras counts them: PyTorch parameters plus BatchNorm moving mean and variance."""
    extra = sum(m.running_mean.numel() + m.running_var.numel()
                for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    return sum(p.numel() for p in model.parameters()) + extra


class PatchWhitening(nn.Conv2d):
    """airbench's first layer: a 2x2 convolution whose filters whiten the training images' 2x2 patches
    (eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), each also negated so that the GELU
    after it keeps both signs). Set once from data by `init_from_data` and then frozen: the net starts from
    decorrelated inputs and learns fast early (cifar10s: validation 0.47 after one epoch, against 0.30-0.37
    for resnet9s). Only the bias trains."""

    def __init__(self, cin: int = 3, size: int = 2, eps: float = 5e-4):
        super().__init__(cin, 2 * cin * size * size, size, padding=0, bias=True)
        self.weight.requires_grad_(False)
        self.eps = eps

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """x: normalized float training images (N, C, H, W); a few thousand are plenty."""
        c, k = self.in_channels, self.kernel_size[0]
        cov, count = torch.zeros(c * k * k, c * k * k, dtype=torch.float64, device=x.device), 0
        for i in range(0, len(x), 256):        # in chunks: 5,000 images hold ~5 million patches
            p = x[i:i + 256].unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
            p = p.double()
            cov += p.T @ p
            count += len(p)
        cov /= count
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)           # ascending; the order does not matter
        filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + self.eps).sqrt()[:, None]).reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def _air_block(cin: int, cout: int, groups: int = 1, members: int = 1) -> nn.Sequential:
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: the second convolution runs at the pooled size.
    `members` networks side by side: the second convolution in `members` groups, the first in `groups` (1
    where every member reads the same input)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, groups=groups), nn.MaxPool2d(2),
                         nn.BatchNorm2d(cout), nn.GELU(), _conv_bn(cout, cout, members))


class MemberHeads(nn.Module):
    """The classifiers of `members` networks trained side by side in one (see airnet's `members`).

    Training mode: (N, members, K) logits, one set per member; the training loss is the sum of the members'
    own losses, so each member learns as if alone (engine.batch_loss). Evaluation mode: the log of the
    members' mean probability, (N, K): the ensemble's prediction, which every scorer reads as logits."""

    def __init__(self, members: int, features: int, num_classes: int):
        super().__init__()
        self.members = members
        bound = features ** -0.5                        # nn.Linear's default initialization, per member
        self.weight = nn.Parameter(torch.empty(members, num_classes, features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("ngc,gkc->ngk", x.unflatten(1, (self.members, -1)), self.weight)     # no batch size: exportable
        if self.training:
            return z
        return mean_probability_logits(z, dim=1)


@register_model
def airnet(num_classes: int = 10, widths: tuple[int, ...] = (48, 128, 192), whiten: bool = True,
           members: int = 1) -> nn.Module:
    """airbench's net (Keller Jordan) scaled for a CPU: patch-whitening stem, a conv-pool-conv block per width.

    The stem is set from the training images before the first step (see PatchWhitening); `whiten = false`
    makes it an ordinary trained 2x2 convolution. The `best` recipe uses widths 32/96/160: on cifar10s (seed 0)
    they scored 0.836 against 0.837 for these wider defaults, in 660 s against 1,046 s (benchmarks/README.md).

    `members = M` trains M such networks (each of `widths`) side by side as one: they share the stem (its
    whitening filters are frozen; its bias trains on the sum of their losses) and every batch, each has its
    own weights (grouped convolutions), initialization and loss, and the model predicts their mean
    probability: an ensemble in one run (see MemberHeads)."""
    if len(widths) < 1 or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a list of positive channel counts, got {widths!r}")
    m = int(members)
    if m < 1:
        raise ValueError(f"members must be >= 1, got {members!r}")
    stem = PatchWhitening(3) if whiten else nn.Conv2d(3, 24, 2, padding=0)
    # The first convolution is not grouped: every member reads the whole (shared) stem output.
    layers, cin, groups = [stem, nn.GELU()], stem.out_channels, 1
    for w in widths:
        layers.append(_air_block(cin, m * int(w), groups, m))
        cin, groups = m * int(w), m
    head = nn.Linear(cin, num_classes, bias=False) if m == 1 else MemberHeads(m, int(widths[-1]), num_classes)
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), head]
    return nn.Sequential(*layers)
