"""precision = 'auto': never the slower of fp32 and bf16 for a model on the machine it runs on.

The choice per CPU kind is forced with monkeypatch (this test machine may or may not have bf16 units);
the timing itself is replaced by scripted seconds where the test is about the choice, and run for real
where it is about leaving the model untouched.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from cnnlab.runtime import device as devmod
from cnnlab.runtime import threads
from cnnlab.config import TrainConfig
from cnnlab.runtime.cache import cache_dir
from cnnlab.training.engine import Batches, Trainer
from cnnlab.models import create_model

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def depthwise_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def scripted_timing(monkeypatch, seconds: dict):
    """step_seconds returns seconds[(model class signature prefix, bf16)]; records every call."""
    calls = []

    def fake(model, shape, device, bf16, train, reps=3):
        calls.append((devmod.model_signature(model), tuple(shape), bf16, train))
        return seconds[(len(list(model.children())), bf16)]
    monkeypatch.setattr(devmod, "step_seconds", fake)
    return calls


def test_explicit_precision_is_obeyed_and_avx2_cpus_never_get_bf16(monkeypatch):
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: False)
    calls = scripted_timing(monkeypatch, {})
    assert devmod.use_bf16("bf16", CPU) is True
    assert devmod.use_bf16("fp32", CPU) is False
    assert devmod.use_bf16("auto", CPU, small_net(), (4, 3, 16, 16)) is False      # emulated bf16: always slower
    assert calls == []                                                              # nothing to measure


def test_auto_picks_the_faster_per_model_and_remembers_it(monkeypatch):
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: True)
    # small_net (6 children): bf16 faster; depthwise_net (5 children): bf16 slower, as on depthwise convs.
    calls = scripted_timing(monkeypatch, {(6, False): 0.02, (6, True): 0.01, (5, False): 0.02, (5, True): 0.03})
    assert devmod.use_bf16("auto", CPU, small_net(), (4, 3, 16, 16)) is True
    assert devmod.use_bf16("auto", CPU, depthwise_net(), (4, 3, 16, 16)) is False
    assert len(calls) == 4 and {c[2] for c in calls} == {False, True}
    # Remembered per CPU and model: a new instance of the same architecture is not timed again...
    assert devmod.use_bf16("auto", CPU, small_net(), (4, 3, 16, 16)) is True
    assert len(calls) == 4
    # ...but another input shape or extraction (forward only) is a new measurement.
    assert devmod.use_bf16("auto", CPU, small_net(), (4, 3, 16, 16), train=False) is True
    assert len(calls) == 6 and calls[-1][3] is False
    known = json.loads((cache_dir() / "precision.json").read_text())
    assert sorted(v["bf16"] for v in known.values()) == [False, True, True]
    assert all(v["fp32_s"] > 0 and v["bf16_s"] > 0 for v in known.values())


def test_measuring_leaves_weights_statistics_grads_and_random_streams_alone():
    torch.manual_seed(0)
    model = small_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    s = devmod.step_seconds(model, (4, 3, 16, 16), CPU, bf16=True, train=True, reps=1)
    assert s > 0
    assert model.training                                        # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # BN running stats too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_training_step_is_timed_even_when_the_caller_is_under_no_grad():
    """Scoring a run that never trained (a solved logistic head, epochs 0) settles precision inside
    torch.no_grad: the timed backward must still have a graph."""
    model = small_net()
    with torch.no_grad():
        assert devmod.step_seconds(model, (4, 3, 16, 16), CPU, bf16=False, train=True, reps=1) > 0
    assert all(p.grad is None for p in model.parameters())


def test_trainer_settles_auto_on_the_first_batch_shape_and_trains_exactly_as_fp32(monkeypatch):
    """On a bf16-capable CPU where fp32 measures faster, an 'auto' run is the fp32 run, bit for bit:
    the measurement draws no random numbers and touches no state."""
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: True)
    # Bitwise comparison: the thread count must not follow the machine's load between the two runs.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    threads.reset()                                   # nothing left active by an earlier test's fit
    shapes = []
    real = devmod.step_seconds

    def timed(model, shape, device, bf16, train, reps=3):
        shapes.append(tuple(shape))
        real(model, shape, device, bf16, train, reps=1)           # really run it: it must not disturb the run
        return 0.01 if not bf16 else 0.02
    monkeypatch.setattr(devmod, "step_seconds", timed)
    g = torch.Generator().manual_seed(0)
    data = Batches(torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 5, (48,), generator=g))

    def history(precision):
        torch.manual_seed(0)
        tr = Trainer(create_model("basenet", 5), TrainConfig(precision=precision, batch_size=12, epochs=2), CPU, 0)
        logs = [tr.train_epoch(data) for _ in range(2)]
        return tr, logs
    auto, h_auto = history("auto")
    assert auto.bf16 is False and shapes == [(12, 3, 32, 32), (12, 3, 32, 32)]
    _, h_fp32 = history("fp32")
    assert h_auto == h_fp32
