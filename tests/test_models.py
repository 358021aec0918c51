"""The practice's models: Keras parameter counts, shapes, the registry and the summary table."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import cnnlab.models as models_mod
from cnnlab.errors import ConfigError
from cnnlab.models import (count_params, create_model, describe, init_from_data, is_registered, list_models,
                           register_model, summary)
from cnnlab.models.cifar import PatchWhitening, keras_param_count

KERAS_COUNTS = {                      # model.summary() totals of the practice's Keras models, 25 classes
    "basenet": 24_197,
    "deepnet": 112_793,
    "deepnet_bn_pre": 113_769,
    "deepnet_bn_post": 113_769,
}


@pytest.mark.parametrize("name, expected", KERAS_COUNTS.items())
def test_keras_param_counts(name, expected):
    model = create_model(name, 25)
    assert keras_param_count(model) == expected


def test_plain_parameter_counts():
    assert count_params(create_model("basenet", 25)) == 24_197
    assert count_params(create_model("deepnet", 25)) == 112_793
    # PyTorch keeps BatchNorm moving mean/variance as buffers: 2 x 244 channels fewer than Keras counts
    bn = create_model("deepnet_bn_pre", 25)
    bn_channels = sum(m.num_features for m in bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert bn_channels == 244
    assert count_params(bn) == 113_769 - 2 * 244 == 113_281
    # counts by hand for BaseNet: conv 3->6 5x5, conv 6->16 5x5, dense 400->50, dense 50->classes
    for k in (10, 25, 100):
        expected = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 50 + 50) + (50 * k + k)
        assert count_params(create_model("basenet", k)) == expected


def test_batchnorm_has_keras_defaults():
    bn = [m for m in create_model("deepnet_bn_post", 25).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(m.eps == pytest.approx(1e-3) and m.momentum == pytest.approx(0.01) for m in bn)


def test_bn_pre_and_post_order():
    pre = [type(m).__name__ for m in create_model("deepnet_bn_pre", 25)]
    post = [type(m).__name__ for m in create_model("deepnet_bn_post", 25)]
    assert pre[:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert post[:3] == ["Conv2d", "ReLU", "BatchNorm2d"]


@pytest.mark.parametrize("name", ["basenet", "deepnet", "deepnet_bn_pre", "deepnet_bn_post", "resnet9s"])
def test_output_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, 25).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 25) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_keras_initialisation():
    torch.manual_seed(0)
    model = create_model("basenet", 25)
    lin = model[-1]
    assert torch.count_nonzero(lin.bias) == 0
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5          # glorot_uniform
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound


def test_registry_lists_builtin_models():
    names = list_models()
    for n in ("basenet", "deepnet", "deepnet_bn_pre", "deepnet_bn_post", "resnet9s"):
        assert n in names
    assert names == sorted(names)
    assert "24,197" in describe("basenet")
    assert is_registered("deepnet") and not is_registered("resnet50")


def test_create_unknown_model():
    with pytest.raises(ConfigError, match="not_a_model"):
        create_model("not_a_model", 10)


def test_create_model_bad_args():
    with pytest.raises(ConfigError, match="basenet"):
        create_model("basenet", 10, nosuch=3)
    assert create_model("resnet9s", 10, width=8)[-1].in_features == 64


def test_register_model(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(models_mod, "_MODELS", dict(models_mod._MODELS))
        m.setattr(models_mod, "_DESCRIPTIONS", dict(models_mod._DESCRIPTIONS))

        @register_model
        def tiny_test_net(num_classes: int = 10, hidden: int = 4) -> nn.Module:
            """A tiny net for the registry test.

            More text that is not shown."""
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        assert "tiny_test_net" in list_models()
        assert describe("tiny_test_net") == "A tiny net for the registry test."
        model = create_model("tiny_test_net", 7, hidden=5)
        assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 7)
        assert count_params(model) == 3 * 32 * 32 * 5 + 5 + 5 * 7 + 7
        with pytest.raises(ValueError, match="twice"):
            register_model(tiny_test_net)
    # The registration does not leak out of the test (checked here, not by a test that relies on running later).
    assert "tiny_test_net" not in list_models()


def test_docstring_counts_match_cnnlab_models():
    for name in ("basenet", "resnet9s"):
        count = f"{keras_param_count(create_model(name, 25)):,}"
        assert count in describe(name), (name, count, describe(name))


def _total(text: str) -> int:
    m = re.search(r"Total params: ([\d,]+)", text)
    assert m, text
    return int(m.group(1).replace(",", ""))


def test_summary_table():
    model = create_model("basenet", 25)
    text = summary(model, (3, 32, 32))
    assert _total(text) == 24_197
    assert "Trainable params: 24,197" in text and "Non-trainable params: 0" in text
    # one row per leaf layer with its output shape and parameter count
    assert re.search(r"0 \(Conv2d\)\s+\(6, 28, 28\)\s+456\b", text)
    assert re.search(r"3 \(Conv2d\)\s+\(16, 10, 10\)\s+2,416\b", text)
    assert re.search(r"7 \(Linear\)\s+\(50,\)\s+20,050\b", text)
    assert re.search(r"9 \(Linear\)\s+\(25,\)\s+1,275\b", text)
    assert model.training           # summary leaves the mode as it found it


def test_summary_of_batchnorm_model():
    model = create_model("deepnet_bn_pre", 25)
    text = summary(model, (3, 32, 32))
    # Keras's count: BatchNorm moving mean/variance are non-trainable parameters (as `cnnlab models` shows).
    assert _total(text) == keras_param_count(model) == 113_769
    assert "Trainable params: 113,281" in text and "Non-trainable params: 488" in text
    assert count_params(model) == 113_281


def _correlated_images(n: int = 48, size: int = 12) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated, as real ones are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size + 1, size + 1, generator=g)
    x = x[..., 1:, 1:] + x[..., :-1, :-1]                 # neighbours share a term
    return x + 2 * x[:, :1]                                 # channels share the first one


def test_patch_whitening_decorrelates_the_training_patches_and_trains_only_its_bias():
    x = _correlated_images()
    layer = PatchWhitening(3)
    before = layer.weight.clone()
    layer.init_from_data(x)
    out = nn.functional.conv2d(x, layer.weight)             # no bias: the second moment of the patches
    first = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    raw = nn.functional.unfold(x, 2).transpose(1, 2).reshape(-1, 12)
    assert (raw.T @ raw / len(raw) - torch.eye(12)).abs().max() > 1.0          # the input is far from white
    torch.testing.assert_close(first.T @ first / len(first), torch.eye(12), atol=0.01, rtol=0)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])                    # both signs survive the GELU
    assert not torch.equal(layer.weight, before)
    assert not layer.weight.requires_grad and layer.bias.requires_grad


def test_airnet_shapes_any_image_size_and_checks_its_widths():
    torch.manual_seed(0)
    model = create_model("airnet", 7, widths=[8, 16, 24]).eval()
    assert isinstance(model[0], PatchWhitening) and model[-1].in_features == 24
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert init_from_data(model, _correlated_images()) is True
    assert init_from_data(create_model("resnet9s", 7, width=4), _correlated_images()) is False   # nothing to set
    plain = create_model("airnet", 7, widths=[8], whiten=False)
    assert not isinstance(plain[0], PatchWhitening) and plain[0].weight.requires_grad
    with pytest.raises(ConfigError, match="widths"):
        create_model("airnet", 7, widths=[8, 0])


def _member(grouped: nn.Module, standalone: nn.Module, k: int) -> None:
    """Copy member k of an airnet with `members` into a plain airnet of the same widths: every tensor of the
    plain net is the k-th slice (along its first dimension) of the grouped one's; the stem is shared."""
    src = grouped.state_dict()
    for name, t in standalone.state_dict().items():
        g = src[name]
        if g.shape == t.shape:                      # the shared stem, counters
            t.copy_(g)
        elif g.ndim == t.ndim + 1:                  # the heads: (members, K, C)
            t.copy_(g[k])
        else:
            t.copy_(g[k * len(t):(k + 1) * len(t)])


def test_airnet_members_are_independent_networks_trained_side_by_side():
    """Each member of `members = 3` computes what a plain airnet with its weights computes, and gets the
    gradient that net would get from its own loss; evaluation predicts the members' mean probability."""
    from cnnlab.training.engine import batch_loss
    torch.manual_seed(0)
    grouped = create_model("airnet", 5, widths=[6, 10, 12], members=3)
    init_from_data(grouped, _correlated_images())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    out = grouped(x)                                              # training mode: (N, members, K)
    assert out.shape == (8, 3, 5)
    total, reported, pred = batch_loss(out, y, 0.1)
    total.backward()
    alone = []
    for k in range(3):
        plain = create_model("airnet", 5, widths=[6, 10, 12])
        with torch.no_grad():
            _member(grouped, plain, k)
        logits = plain(x)
        torch.testing.assert_close(out[:, k], logits, rtol=1e-4, atol=1e-5)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum")
        loss.backward()
        alone.append(loss.detach())
        # Member k's gradients are the plain net's (the stem bias is shared: it gets the members' sum).
        g = create_model("airnet", 5, widths=[6, 10, 12])
        grads = {n: p.grad for n, p in grouped.named_parameters() if not n.startswith("0.")}
        mine = dict(g.named_parameters())
        with torch.no_grad():
            for n, p in grads.items():
                mine[n].copy_(p[k] if p.ndim == mine[n].ndim + 1 else p[k * len(mine[n]):(k + 1) * len(mine[n])])
        for n, p in plain.named_parameters():
            if not n.startswith("0."):
                torch.testing.assert_close(mine[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)
    torch.testing.assert_close(total, sum(alone))
    torch.testing.assert_close(reported, sum(alone) / 3)
    torch.testing.assert_close(pred, out.detach().softmax(-1).mean(1))
    grouped.eval()
    with torch.no_grad():
        ens = grouped(x)
    probs = []
    for k in range(3):
        plain = create_model("airnet", 5, widths=[6, 10, 12])
        with torch.no_grad():
            _member(grouped, plain, k)
            probs.append(plain.eval()(x).softmax(-1))
    torch.testing.assert_close(ens.exp(), torch.stack(probs).mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="members"):
        create_model("airnet", 5, members=0)
