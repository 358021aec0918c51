"""Feature extraction with a compiled backbone: the same features as eager extraction, never stale weights,
a failed compile falls back to eager, and only long fp32 CPU extractions are compiled."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.transfer import features
from cnnlab.transfer.features import extract, flops_per_image, should_compile
from cnnlab.data.preprocess import Preprocess

CPU = torch.device("cpu")


def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def images(n: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def run(backbone: nn.Module, x: torch.Tensor, compile: bool, mirror: bool = False) -> torch.Tensor:
    # batch 4 over 10 images: two full batches through the compiled graph, a short last one eagerly
    return extract(backbone, x, Preprocess(16, 16), CPU, False, batch_size=4, quiet=True, mirror=mirror,
                   compile=compile)


@pytest.fixture(autouse=True)
def fresh_compile_state(monkeypatch):
    monkeypatch.setattr(features, "_compiled", None)
    monkeypatch.setattr(features, "_compile_failed", False)


def test_compiled_extraction_matches_eager_and_never_uses_stale_weights():
    net, x = tiny_backbone(), images()
    eager, compiled = run(net, x, False), run(net, x, True)
    assert compiled.shape == (10, 8) and compiled.abs().sum() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    fn = features._compiled[1]
    torch.testing.assert_close(run(net, x, True, mirror=True), run(net, x, False, mirror=True), rtol=1e-5,
                               atol=1e-6)
    assert features._compiled[1] is fn                       # the mirrored view reused the compiled copy
    # Freezing bakes the weights in: after an in-place change (fine-tuning after a probe) the next
    # extraction must compile the new weights, not reuse the old ones.
    with torch.no_grad():
        net[0].weight.mul_(-2)
    changed = run(net, x, True)
    assert features._compiled[1] is not fn
    torch.testing.assert_close(changed, run(net, x, False), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed, eager, atol=1e-3)
    features.release_compiled()
    assert features._compiled is None


def test_a_failed_compile_falls_back_to_eager_once_and_for_all(monkeypatch):
    def broken(module, **kwargs):
        def fails(x):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return fails
    monkeypatch.setattr(torch, "compile", broken)
    net, x = tiny_backbone(), images()
    with pytest.warns(UserWarning, match=r"compiling the backbone failed \(RuntimeError: no C\+\+ compiler found\)"):
        got = run(net, x, True)
    assert torch.equal(got, run(net, x, False))
    assert not should_compile(net, 10**12, 16, CPU, False)   # not tried again in this process


def test_only_long_cpu_extractions_are_compiled():
    net = tiny_backbone().eval()
    per_image = flops_per_image(net, 16, CPU)
    assert per_image == 2 * 3 * 9 * 8 * 16 * 16            # the convolution's multiply-adds, counted twice
    enough = int(features.COMPILE_FLOPS // per_image) + 1
    assert enough > features.COMPILE_MIN_IMAGES
    assert should_compile(net, enough, 16, CPU, False)
    assert not should_compile(net, enough - 1, 16, CPU, False)            # too little work
    assert not should_compile(net, enough, 16, torch.device("cuda"), False)
    # Much work in few images (a large input): still too few images to repay a compile.
    big = features.COMPILE_MIN_IMAGES
    assert should_compile(net, big, 2048, CPU, False)
    assert not should_compile(net, big - 1, 512, CPU, False)
    # bf16 autocast gains less from compiling: it repays the compile only over more images.
    big16 = features.COMPILE_MIN_IMAGES_BF16
    assert big16 > big
    assert should_compile(net, big16, 2048, CPU, True)
    assert not should_compile(net, big16 - 1, 2048, CPU, True)
    assert should_compile(net, big16 - 1, 2048, CPU, False)
