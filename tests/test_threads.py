"""cnnlab.runtime.threads: the thread count follows the free cores (no timing is asserted here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.runtime import threads

STAT = """cpu  1000 50 200 9000 10 5 5 40 0 0
cpu0 600 0 100 4500 5 5 5 20 0 0
cpu1 400 50 100 4500 5 0 0 20 0 0
intr 123
procs_running 3
procs_blocked 0
"""


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    threads.reset()
    yield
    threads.reset()
    torch.set_num_threads(n)


def fake_load(monkeypatch, *, cores: float = 0.0, capacity: float = 2.0):
    """Replace the measurements: other processes keep `cores` cores busy, or later the load set in
    the returned dict ({'cores': ...}); snapshots are 1 s apart."""
    epoch = {"cores": cores, "t": 0.0}
    monkeypatch.setattr(threads, "PROBE_S", 0.0)
    monkeypatch.setattr(threads, "cpu_capacity", lambda: capacity)

    def snap():
        epoch["t"] += 1.0     # each snapshot 1 s after the last; busy = foreign cores x 1 s, own = 0
        epoch["busy"] = epoch.get("busy", 0.0) + epoch["cores"]
        return threads.Snapshot(epoch["t"], epoch["busy"], 0.0)
    monkeypatch.setattr(threads, "snapshot", snap)
    return epoch


def test_choose_gives_the_free_cores_rounded_down():
    assert threads.choose(2, 2.0, 0.0) == 2
    assert threads.choose(2, 2.0, 0.2) == 2            # daemons, short bursts
    assert threads.choose(2, 2.0, 0.67) == 1           # a busy process sharing with our 2 threads
    assert threads.choose(2, 2.0, 1.0) == 1
    assert threads.choose(2, 2.0, 7.0) == 1            # never below one
    assert threads.choose(1, 2.0, 0.0) == 1            # never above the base
    assert threads.choose(16, 16.0, 4.0) == 12
    assert threads.choose(16, 16.0, 4.5) == 11
    assert threads.choose(8, 4.0, 0.0) == 4            # a cgroup quota of 4 cores


def test_parse_cpu_max_and_busy_seconds():
    assert threads.parse_cpu_max("200000 100000\n") == 2.0
    assert threads.parse_cpu_max("max 100000\n") is None
    assert threads.parse_cpu_max("garbage") is None
    tck = threads._CLK_TCK
    # user + nice + system + irq + softirq + steal (idle and iowait excluded)
    assert threads.parse_busy_seconds(STAT) == pytest.approx((1000 + 50 + 200 + 5 + 5 + 40) / tck)
    assert threads.parse_busy_seconds(STAT, {1}) == pytest.approx((400 + 50 + 100 + 20) / tck)
    assert threads.parse_busy_seconds(STAT, {0, 1}) == pytest.approx((730 + 570) / tck)
    assert threads.parse_busy_seconds(STAT, niced=False) == pytest.approx((1000 + 200 + 5 + 5 + 40) / tck)


def test_foreign_cores_subtracts_our_own_cpu_time():
    a = threads.Snapshot(wall=10.0, busy=100.0, own=5.0)
    b = threads.Snapshot(wall=12.0, busy=104.0, own=7.0)          # 4 CPU s busy, 2 of them ours
    assert threads.foreign_cores(a, b) == pytest.approx(1.0)
    assert threads.foreign_cores(a, threads.Snapshot(12.0, 101.0, 7.0)) == 0.0   # never negative
    assert threads.foreign_cores(a, a) == 0.0


def test_real_measurements_are_sane():
    s0 = threads.snapshot()
    sum(i * i for i in range(100_000))
    s1 = threads.snapshot()
    assert 0 <= threads.foreign_cores(s0, s1) < 10_000
    assert s1.wall > s0.wall and s1.own >= s0.own and s1.busy >= s0.busy
    assert threads.cpu_capacity() >= 1


def test_busy_machine_gets_one_thread_then_the_cores_back(monkeypatch):
    torch.set_num_threads(2)
    load = fake_load(monkeypatch, cores=1.0)
    assert threads.configure(None, "cpu") == 1 and torch.get_num_threads() == 1
    assert threads.on_epoch_end(None, 1.0) == 1                   # still loaded
    load["cores"] = 0.0
    assert threads.on_epoch_end(None, 1.0) == 2 and torch.get_num_threads() == 2
    load["cores"] = 0.7
    assert threads.on_epoch_end(None, 1.0) == 1
    s = threads.summary()
    assert s["base"] == 2 and [c["threads"] for c in s["changes"]] == [1, 2, 1]


def test_idle_machine_changes_nothing(monkeypatch):
    torch.set_num_threads(2)
    fake_load(monkeypatch, cores=0.0)
    assert threads.configure(None, torch.device("cpu")) == 2
    for _ in range(3):
        assert threads.on_epoch_end(None, 1.0) == 2
    assert [c["threads"] for c in threads.summary()["changes"]] == [2]


def test_users_choice_is_the_ceiling(monkeypatch):
    torch.set_num_threads(1)                                        # the user's own choice
    fake_load(monkeypatch, cores=0.0)
    assert threads.configure(None, "cpu") == 1
    assert threads.on_epoch_end(None, 1.0) == 1


def test_pinned_gpu_and_foreign_changes_are_left_alone(monkeypatch):
    torch.set_num_threads(2)
    load = fake_load(monkeypatch, cores=1.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.configure(None, "cpu") == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.configure(None, "meta") == 2 and torch.get_num_threads() == 2   # not CPU training
    assert threads.configure(None, "cpu") == 1
    torch.set_num_threads(2)                                        # someone else decided meanwhile
    load["cores"] = 1.0
    assert threads.on_epoch_end(None, 1.0) == 2 and torch.get_num_threads() == 2


def test_short_windows_keep_measuring(monkeypatch):
    torch.set_num_threads(2)
    fake_load(monkeypatch, cores=0.0)
    threads.configure(None, "cpu")
    monkeypatch.setattr(threads, "MIN_WINDOW_S", 5.0)               # the fake snapshots are 1 s apart
    mark = threads._state.mark
    threads.on_epoch_end(None, 0.1)
    assert threads._state.mark is mark


def _train(nthreads: int) -> torch.Tensor:
    torch.set_num_threads(nthreads)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 14 * 14, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_thread_count_changes_only_summation_order():
    """Same count: bitwise equal. Another count: equal within float rounding (what threads.py promises)."""
    c = _train(1)
    a, b = _train(2), _train(2)
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_on_step_measures_only_every_few_seconds(monkeypatch):
    torch.set_num_threads(2)
    load = fake_load(monkeypatch, cores=0.0)
    threads.configure(None, "cpu")
    load["cores"] = 1.0
    assert threads.on_step() is None and torch.get_num_threads() == 2     # not yet: next_check is ahead
    threads._state.next_check = 0.0
    assert threads.on_step() == 1 and torch.get_num_threads() == 1
    assert threads.on_step() is None                                     # the next window has begun
    assert threads.summary()["changes"][-1]["at"] == "epoch 1, step"
