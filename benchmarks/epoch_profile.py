"""Where one training epoch's time goes, part by part, for a recipe on this machine (the code of profile.py).

Usage: python benchmarks/profile.py RECIPE [--epochs 3] [--steps N] [--device cuda]   RECIPE: basenet | bnpre | resnet50

  basenet   BaseNet, SGD, batch 64, 11,250 training / 1,250 validation images (as cifar_speed.py)
  bnpre     BN-before-ReLU deeper net, Adam, batch 32, featurewise normalization, zoom 0.2 + flip,
            2,700 training / 300 validation images (as cifar_speed.py)
  resnet50  timm resnet50 (random weights) + Dense(400) head, 200 classes, SGD momentum 0.9, batch 32,
            stored 256x256, random-resized crop + flip to 224 (the CUB fine-tuning recipe); a few steps
            only (--steps, default 4) and 64 validation images (central 0.875 crop to 224)

The train step is Trainer.train_epoch's (src/cnnlab/training/engine.py) with a timer around each part: gather the
batch by index from the uint8 tensor, Normalizer, Augmenter (and the memory-format copy), forward under
bf16 autocast where the CPU has fast bf16, cross-entropy, zero_grad + backward, fused optimizer step,
metric bookkeeping; then Trainer.evaluate on the validation split. The model, optimizer, precision and
memory format are the Trainer's own, and cnnlab.runtime.threads sets the thread count as fit does. CPU ops run
synchronously, so a timer around a part measures that part; on a GPU (--device cuda) every timer
synchronizes the device first (which adds the syncs a real epoch does not have: compare wall times).

Python/dispatch: each row above it is net of its estimated framework overhead (aten ops the part calls,
counted with a dispatch mode, x the measured cost of a tiny op: forward-side ops from Python, backward
ops inside autograd's engine); the row adds those estimates and the loop time outside every timer.
GFLOP/s: FLOPs of the part (torch.utils.flop_counter: convolutions and matmuls) / its measured time;
the peak is a large fp32 (and bf16) matmul timed here with the same threads. Each figure is the median
over --epochs timed epochs (after a warm-up of a few steps).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.data.preprocess import Preprocess
from cnnlab.runtime import threads
from cnnlab.data.augment import Augmenter
from cnnlab.config import AugmentConfig, TrainConfig
from cnnlab.runtime.device import autocast
from cnnlab.training.engine import Batches, Trainer
from cnnlab.data.preprocess import Normalizer, center_crop

PARTS = ["batch gather", "normalization", "augmentation", "forward", "loss", "backward", "optimizer step",
         "metric bookkeeping", "validation"]


# ---------------------------------------------------------------- the recipes

def recipe(name: str, steps: int | None, device: torch.device):
    """(trainer, train split, validation split, description) of a recipe, on random data."""
    g = torch.Generator().manual_seed(0)
    if name in ("basenet", "bnpre"):
        from cnnlab.models import create_model
        n_tr, n_va, bs = (11250, 1250, 64) if name == "basenet" else (2700, 300, 32)
        if steps:
            n_tr = steps * bs
        x = torch.randint(0, 256, (n_tr + n_va, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 25, (n_tr + n_va,), generator=g)
        torch.manual_seed(0)
        if name == "basenet":
            cfg, model, norm, aug = TrainConfig(optimizer="sgd", batch_size=bs), create_model("basenet", 25), Normalizer(), None
        else:
            cfg, model = TrainConfig(optimizer="adam", batch_size=bs), create_model("deepnet_bn_pre", 25)
            norm, aug = Normalizer.fit(x[:n_tr]), Augmenter(AugmentConfig(zoom=0.2, hflip=True))
        tr = Trainer(model, cfg, device, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0), aug)
        desc = f"{name}: {cfg.optimizer}, batch {bs}, {n_tr} training / {n_va} validation images"
    elif name == "resnet50":
        from cnnlab.models.backbones import TransferNet, create_backbone
        bs, n_tr, n_va = 32, 32 * (steps or 4), 64
        x = torch.randint(0, 256, (n_tr + n_va, 3, 256, 256), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 200, (n_tr + n_va,), generator=g)
        torch.manual_seed(0)
        backbone, nf, norm, size = create_backbone("resnet50", "none")
        cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=bs)
        aug = Augmenter(AugmentConfig(random_resized_crop=True, hflip=True), size)
        tr = Trainer(TransferNet(backbone, nf, 200, [400]), cfg, device, 0, Preprocess.from_normalizer(norm, 0, 0, 1.0), aug,
                     image_size=size, eval_crop=0.875)
        desc = f"resnet50 at {size}: sgd momentum 0.9, batch {bs}, {n_tr} training / {n_va} validation images (256 stored)"
    else:
        raise SystemExit(f"unknown recipe {name!r}: basenet, bnpre or resnet50")
    x, y = x.to(device), y.to(device)               # uint8 on the device, as the engine keeps them
    return tr, Batches(x[:n_tr], y[:n_tr]), Batches(x[n_tr:], y[n_tr:]), desc


# ---------------------------------------------------------------- one step, in parts

def step_parts(tr: Trainer, data: Batches, idx_from: torch.Tensor, hooks: dict | None = None):
    """One training step as train_epoch runs it, yielding (part, seconds); hooks[part] wraps a part in a
    context (op counting, FLOP counting)."""
    cfg, model, opt = tr.cfg, tr.net, tr.optimizer
    hooks = hooks or {}
    ctx = lambda p: hooks.get(p, nullcontext)()          # noqa: E731
    t = clock(tr.device)
    out = {}
    a = t()
    with ctx("batch gather"):
        idx = idx_from
        xb, yb = data.x[idx], data.y[idx]
    b = t()
    with ctx("normalization"):
        xb = tr.normalizer(xb)
    c = t()
    with ctx("augmentation"):
        if tr.augmenter is not None and tr.augmenter.active:
            xb = tr.augmenter(xb, tr.aug_gen)
        if tr.image_size and xb.shape[-1] != tr.image_size:
            xb = center_crop(xb, tr.eval_crop, tr.image_size)
        xb = xb.contiguous(memory_format=tr.memory_format)
    d = t()
    with ctx("forward"), autocast(tr.device, tr.bf16):
        logits = model(xb)
    e = t()
    with ctx("loss"):
        loss_sum_b = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing, reduction="sum")
        loss = loss_sum_b / len(idx)
    f = t()
    with ctx("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    g = t()
    with ctx("optimizer step"):
        opt.step()
    h = t()
    with ctx("metric bookkeeping"):
        tr._loss_sum += loss_sum_b.detach()
        tr._correct += (logits.detach().argmax(1) == yb).sum()
    k = t()
    for p, (s, u) in zip(PARTS[:-1], [(a, b), (b, c), (c, d), (d, e), (e, f), (f, g), (g, h), (h, k)]):
        out[p] = u - s
    return out


def clock(device: torch.device):
    """perf_counter, after waiting for the device's queued work when it runs asynchronously (CUDA)."""
    if device.type != "cuda":
        return time.perf_counter
    return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]


def timed_epoch(tr: Trainer, data: Batches, val: Batches) -> tuple[dict, float, int]:
    """Seconds per part over one epoch (validation included), the epoch's wall time, and its steps."""
    tr.net.train()
    n, bs = len(data), tr.cfg.batch_size
    steps = math.ceil(n / bs)
    tot = dict.fromkeys(PARTS, 0.0)
    t = clock(tr.device)
    t0 = t()
    perm = torch.randperm(n, generator=tr.shuffle_gen).to(tr.device)
    tr._loss_sum = torch.zeros((), device=tr.device)
    tr._correct = torch.zeros((), dtype=torch.long, device=tr.device)
    for i in range(steps):
        for p, s in step_parts(tr, data, perm[i * bs:(i + 1) * bs]).items():
            tot[p] += s
    _ = tr._loss_sum.item(), tr._correct.item()
    v = t()
    tr.evaluate(val)
    tot["validation"] = t() - v
    return tot, t() - t0, steps


# ---------------------------------------------------------------- counting: ops, FLOPs, dispatch cost, peak

class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_step(tr: Trainer, data: Batches) -> tuple[dict, dict]:
    """aten ops and FLOPs of each part in one step (a step that is not timed)."""
    ops, flops = {}, {}
    idx = torch.arange(min(tr.cfg.batch_size, len(data)), device=tr.device)
    tr._loss_sum = torch.zeros((), device=tr.device)
    tr._correct = torch.zeros((), dtype=torch.long, device=tr.device)
    counters = {}

    def make(p):
        def ctx():
            counters[p] = (OpCount(), FlopCounterMode(display=False))
            return _Both(*counters[p])
        return ctx
    step_parts(tr, data, idx, {p: make(p) for p in PARTS[:-1]})
    for p, (oc, fc) in counters.items():
        ops[p], flops[p] = oc.n, fc.get_total_flops()
    return ops, flops


class _Both:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def __enter__(self):
        self.b.__enter__()
        self.a.__enter__()

    def __exit__(self, *e):
        self.a.__exit__(*e)
        self.b.__exit__(*e)


def dispatch_cost() -> tuple[float, float]:
    """Seconds per tiny aten op: called from Python with autograd recording, and run by autograd's backward."""
    x = torch.ones(4, requires_grad=True)
    best_f = best_b = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        y = x
        for _ in range(200):
            y = y * 1.0001
        t1 = time.perf_counter()
        with OpCount() as oc:
            y.sum().backward()
        n_b = oc.n
        y = x
        for _ in range(200):
            y = y * 1.0001
        t2 = time.perf_counter()
        y.sum().backward()
        t3 = time.perf_counter()
        best_f, best_b = min(best_f, (t1 - t0) / 200), min(best_b, (t3 - t2) / n_b)
    return best_f, best_b


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> tuple[float, int]:
    """(GFLOP/s, n) of an n x n x n matmul, best of 3 after a warm-up; n = 512 where the dtype is slow
    (bf16 without bf16 instructions: a 2048 matmul would take half a minute)."""
    a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 512).to(dtype)
    t0 = time.perf_counter()
    torch.mm(a, b)
    if time.perf_counter() - t0 < 0.05:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
    n = len(a)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9, n


# ---------------------------------------------------------------- report

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", choices=["basenet", "bnpre", "resnet50"])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (the median is reported)")
    ap.add_argument("--steps", type=int, help="steps per epoch (default: the whole split; resnet50: 4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    tr, data, val, desc = recipe(a.recipe, a.steps, torch.device(a.device))
    nthreads = threads.configure(tr.model, tr.device)
    (fp32, n32), (bf16, n16) = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    c_fwd, c_bwd = dispatch_cost()
    warm = Batches(data.x[:tr.cfg.batch_size * 3], data.y[:tr.cfg.batch_size * 3])
    timed_epoch(tr, warm, Batches(val.x[:8], val.y[:8]))                 # warm-up: oneDNN primitives, allocator
    ops, flops = count_step(tr, data)
    runs = [timed_epoch(tr, data, val) for _ in range(a.epochs)]
    steps = runs[0][2]
    med = {p: statistics.median(r[0][p] for r in runs) for p in PARTS}
    wall = statistics.median(r[1] for r in runs)
    disp = {p: min(med[p] / steps, ops[p] * (c_bwd if p == "backward" else c_fwd)) for p in PARTS[:-1]}
    rest = max(0.0, wall - sum(med.values()))
    print(f"{desc}; torch {torch.__version__}, {nthreads} threads, {'bf16 autocast' if tr.bf16 else 'fp32'}, "
          f"{'channels_last' if tr.memory_format == torch.channels_last else 'contiguous'}")
    print(f"peak ({nthreads} threads): fp32 matmul {n32}^3 {fp32:.0f} GFLOP/s, bf16 matmul {n16}^3 {bf16:.1f} GFLOP/s; "
          f"tiny-op cost: {c_fwd * 1e6:.1f} us from Python, {c_bwd * 1e6:.1f} us in backward")
    print(f"{steps} steps/epoch, median of {a.epochs} epochs: {wall:.2f} s/epoch, "
          f"{len(data) / wall:.0f} training img/s (validation included)\n")
    peak = bf16 if tr.bf16 else fp32
    print(f"| part | ms/step | % of epoch | aten ops/step | GFLOP/s (% of peak) |")
    print(f"|---|---:|---:|---:|---:|")
    rows = []
    for p in PARTS:
        ms = (med[p] / steps - disp.get(p, 0.0)) * 1e3
        gf = ""
        if flops.get(p):
            r = flops[p] / (med[p] / steps) / 1e9
            gf = f"{r:.1f} ({100 * r / peak:.0f}%)"
        rows.append((p, ms, f"{ops[p]}" if p in ops else "", gf))
    over = (sum(disp.values()) + rest / steps) * 1e3
    rows.append(("Python/dispatch overhead", over, f"{sum(ops.values())}", ""))
    total_flops = sum(flops.values())
    for p, ms, n, gf in rows:
        print(f"| {p} | {ms:.2f} | {100 * ms / (wall / steps * 1e3):.1f} | {n} | {gf} |")
    r = total_flops / (wall / steps) / 1e9
    print(f"| **epoch** | {wall / steps * 1e3:.2f} | 100 | | {r:.1f} ({100 * r / peak:.0f}%) |")


if __name__ == "__main__":
    main()
