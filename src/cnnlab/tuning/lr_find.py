"""`cnnlab lr-find`: the learning-rate range test, as fastai's `Learner.lr_find` does it.

Training steps with the lr rising exponentially from start_lr (1e-7) to end_lr (10), lr_i = start *
(end/start)^(i/steps); the loss recorded is fastai's smoothed one (an exponential moving average, beta 0.98,
debiased); the test stops when that loss exceeds 4x its minimum (divergence) or is not finite. Then the model,
the optimizer and every random stream are restored exactly, so the test leaves the Trainer as it found it.

The suggestion is fastai's `valley` rule, on the recorded curve without its first tenth and last 5 points (as
fastai): the longest stretch over which the smoothed loss keeps falling (a longest decreasing subsequence,
ending at the point where it is longest), and the lr at (its start + int(len/3) + int(len/6)) -- about half
way down it, where the loss falls fastest and well before it turns.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.errors import CnnlabError
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import Split, Trainer

RULE = "valley (fastai: about half way down the longest falling stretch of the smoothed loss)"


@dataclass
class LRFind:
    """The range test's curve and suggestion (`cnnlab.lr_find` returns it; lr_find.json holds the same)."""
    lrs: list[float]
    losses: list[float]            # smoothed, as plotted
    suggestion: float | None       # the valley lr
    index: int | None              # its position in lrs
    rule: str = RULE
    stopped: str = ""              # why the test ended: steps done, or divergence
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"suggestion": self.suggestion, "rule": "valley", "rule_description": self.rule,
                "index": self.index, "stopped": self.stopped, **self.extra,
                "lrs": self.lrs, "losses": self.losses}


def valley(lrs: list[float], losses: list[float]) -> tuple[float, int]:
    """fastai's valley suggestion (fastai.callback.schedule.valley): (lr, its index in lrs)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n                              # longest decreasing run of losses ending at i
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max(0, max_start + int(sections) + int(sections / 2))
    return float(lrs[idx]), idx


def suggest(lrs: list[float], losses: list[float], steps: int) -> tuple[float | None, int | None]:
    """valley() on the curve fastai judges: the first steps//10 and the last 5 points left out, and
    nothing from the first non-finite loss on. None when too little of the curve is left."""
    lo = steps // 10
    part = losses[lo:len(losses) - 5]
    finite = next((i for i, v in enumerate(part) if not math.isfinite(v)), len(part))
    part = part[:finite]
    if len(part) < 2:
        return None, None
    lr, idx = valley(lrs[lo:lo + len(part)], part)
    return lr, lo + idx


class _Stop(Exception):
    pass


class _RangeTest(Callback):
    """Sets each step's lr and records the smoothed loss (fastai's LRFinder + Recorder + AvgSmoothLoss)."""

    def __init__(self, start: float, end: float, steps: int, beta: float, stop_div: bool):
        self.start, self.end, self.steps, self.beta, self.stop_div = start, end, steps, beta, stop_div
        self.i, self.avg, self.best = 0, 0.0, math.inf
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.stopped = ""

    def lr_at(self, i: int) -> float:
        return self.start * (self.end / self.start) ** (i / self.steps)

    def set_lr(self, trainer: Trainer, lr: float) -> None:
        for g in trainer.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)

    def on_batch_end(self, trainer, n: int, loss) -> None:
        self.lrs.append(self.lr_at(self.i))
        self.i += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * float(loss)     # one sync per step: a few hundred
        smooth = self.avg / (1 - self.beta ** self.i)
        self.losses.append(smooth)
        self.best = min(self.best, smooth)
        if not math.isfinite(smooth) or (self.stop_div and smooth > 4 * self.best):
            self.stopped = f"diverged at step {self.i} (smoothed loss {smooth:.4g} > 4 x its minimum {self.best:.4g})"
            raise _Stop
        if self.i >= self.steps:
            self.stopped = f"{self.steps} steps done"
            raise _Stop
        self.set_lr(trainer, self.lr_at(self.i))


def range_test(trainer: Trainer, train: Split, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
               beta: float = 0.98, stop_div: bool = True) -> LRFind:
    """The range test on `trainer` (built as for a run: optimizer, augmentation, precision) over `train`,
    as many epochs as the steps need; the trainer's weights, optimizer state, step counters and random
    streams are restored bit-exactly afterwards."""
    check_args(start_lr, end_lr, steps)
    if trainer.cfg.schedule != "constant" or trainer.cfg.warmup_epochs:
        raise CnnlabError("lr-find: give the trainer a constant schedule without warmup (the test sets each "
                          "step's lr itself)")
    saved = copy.deepcopy(trainer.state_dict())
    callbacks, test = trainer.callbacks, _RangeTest(start_lr, end_lr, steps, beta, stop_div)
    trainer.callbacks = [test]
    test.set_lr(trainer, start_lr)
    try:
        while True:
            trainer.train_epoch(train)
    except _Stop:
        pass
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.load_state_dict(saved)
        trainer.callbacks = callbacks
    lr, idx = suggest(test.lrs, test.losses, steps)
    return LRFind(test.lrs, test.losses, lr, idx, stopped=test.stopped,
                  extra={"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "beta": beta})


def plot(result: LRFind, path: Path, title: str = "") -> None:
    """Smoothed loss vs lr (log axis), without the last 5 points (fastai's plot_lr_find), the suggestion marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnlab.records.io import atomic_write
    n = max(1, len(result.lrs) - 5)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs[:n], result.losses[:n])
    if result.suggestion is not None:
        ax.plot([result.suggestion], [result.losses[result.index]], "o", color="C1",
                label=f"valley: {result.suggestion:.2e}")
        ax.legend()
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title=title or "lr-find")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def build_trainer(cfg, out_dir: Path, progress: str = "bar", start_lr: float = 1e-7):
    """(Trainer, Plan) for a config's run: its data, model, optimizer, augmentation and precision as `cnnlab run`
    builds them, with a constant lr and no warmup (the range test sets each step's lr itself)."""
    import dataclasses

    from cnnlab.data.augment import Augmenter
    from cnnlab.experiments.prepare import prepare
    from cnnlab.experiments.run import init_layers_from_data
    from cnnlab.runtime import threads
    plan = prepare(cfg, source=str(out_dir), progress=progress)
    init_layers_from_data(plan.trained, plan.splits.train, plan.preprocess)
    tcfg = dataclasses.replace(plan.train_config, schedule="constant", warmup_epochs=0.0, lr=start_lr)
    trainer = Trainer(plan.trained, tcfg, plan.device, cfg.seed, plan.preprocess, Augmenter(cfg.augment, plan.size))
    threads.configure(trainer.model, trainer.device, tcfg.threads, tcfg.deterministic)
    return trainer, plan


def lr_find(cfg, out_dir: Path, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            progress: str = "bar") -> LRFind:
    """The range test for a config's run (build_trainer); writes lr_find.png and lr_find.json in out_dir."""
    from cnnlab.records.io import write_json
    check_args(start_lr, end_lr, steps)
    trainer, plan = build_trainer(cfg, out_dir, progress, start_lr)
    tcfg = trainer.cfg
    result = range_test(trainer, plan.splits.train, start_lr=start_lr, end_lr=end_lr, steps=steps)
    result.path = Path(out_dir)
    result.extra.update(config=cfg.name, optimizer=tcfg.optimizer, batch_size=tcfg.batch_size)
    write_json(result.path / "lr_find.json", result.to_json())
    plot(result, result.path / "lr_find.png", f"{cfg.name}: lr-find ({tcfg.optimizer}, batch {tcfg.batch_size})")
    return result


def check_args(start_lr: float, end_lr: float, steps: int) -> None:
    if not (0 < start_lr < end_lr):
        raise CnnlabError(f"lr-find: needs 0 < --start-lr < --end-lr; got {start_lr:g} and {end_lr:g}")
    if steps < 20:
        raise CnnlabError(f"lr-find: --steps {steps}: give 20 or more (the valley rule leaves out the first tenth "
                          f"and the last 5 points; fastai uses 100, a few hundred is better)")


def run_lr_find(cfg, out: str | Path | None, runs_dir: str | Path = "runs", *, start_lr: float = 1e-7,
                end_lr: float = 10.0, steps: int = 200, progress: str = "bar") -> LRFind:
    """`cnnlab lr-find`: the test into `out` (None: a new RUNS/<name>-lr-find-<stamp>), and what it found."""
    from cnnlab.records.runs import RunFolder
    check_args(start_lr, end_lr, steps)
    if out is None:
        folder = RunFolder.create(runs_dir, f"{cfg.name}-lr-find").path
    else:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
    r = lr_find(cfg, folder, start_lr=start_lr, end_lr=end_lr, steps=steps, progress=progress)
    print(f"lr-find: {len(r.lrs)} steps, lr {start_lr:.0e} -> {r.lrs[-1]:.2e} ({r.extra['optimizer']}, batch "
          f"{r.extra['batch_size']}): {r.stopped}")
    if r.suggestion is None:
        print("no suggestion: the loss diverged too early; lower --start-lr or --end-lr, or give more --steps")
    else:
        print(f"suggested lr: {r.suggestion:.2e}  (rule: {r.rule}); use it: --set train.lr={r.suggestion:.2g}")
    print(f"-> {folder / 'lr_find.png'}, lr_find.json")
    return r
