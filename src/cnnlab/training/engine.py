"""Training and evaluation loops.

Design (after airbench): the whole split lives on the device as a uint8 tensor; each step gathers a
batch by index, converts and augments it with batched tensor ops, and runs the model. Metrics are
accumulated on the device and read once per epoch, so the loop never waits on the host. A split over the
memory budget is `Streamed` instead (cnnlab.data.stream): the same batches for the same indices, read from
host storage on a background thread; the loop asks both kinds for its batches the same way.

`fit(trainer, train, val, callbacks)` owns the epochs and the phases of a run: with `head_epochs`, the
first epochs train the head alone (backbone frozen), then everything; one optimizer and one learning-rate
schedule span both phases (warmup once, the schedule ends at the last epoch of the run). Everything else
done around the loop (progress, history, checkpoints, early stopping, trackers) is a callback.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.runtime import distributed, threads
from cnnlab.config import TrainConfig
from cnnlab.data.augment import Augmenter, alternating_flips, resize, train_side
from cnnlab.data.preprocess import Preprocess, layout
from cnnlab.data.stream import Batches, Streamed
from cnnlab.models import forward
from cnnlab.models.build import inference_model
from cnnlab.models.parts import is_backbone_model
from cnnlab.runtime.device import autocast, precision_is_measured, use_bf16
from cnnlab.training.callbacks import Callback, callback_states, restore_states


# ---------------------------------------------------------------- optimizer and schedule

def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups: backbone and head (backbone lr = lr * backbone_lr_mult), each split into
    weight-decayed weights and undecayed 1-d parameters (BatchNorm weights and biases, all biases), as
    timm's param_groups_weight_decay does; `decay_norm_and_bias = true` decays everything."""
    if is_backbone_model(model) and cfg.backbone_lr_mult != 1.0:
        parts = [(model.backbone, cfg.backbone_lr_mult), (model.head, 1.0)]
    else:
        parts = [(model, 1.0)]
    base_lr = cfg.effective_lr
    groups = []
    for module, mult in parts:
        for g in decay_groups(module, cfg.weight_decay, exclude_1d=not cfg.decay_norm_and_bias):
            groups.append({**g, "lr_mult": mult, "base_lr": base_lr * mult, "lr": base_lr * mult})
    return groups


def decay_groups(module: nn.Module, weight_decay: float, exclude_1d: bool = True) -> list[dict]:
    """timm.optim.param_groups_weight_decay's rule, groups in its order: trainable 1-d parameters and biases
    undecayed (exclude_1d), the rest decayed. Not imported from timm because importing timm pulls in
    torchvision's model zoo: 5 s of start-up on a 2-core CPU, in every run, for nets that use neither."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            skip = not weight_decay or (exclude_1d and (p.ndim <= 1 or name.endswith(".bias")))
            (no_decay if skip else decay).append(p)
    return [g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
            if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    lr = groups[-1]["base_lr"]
    # fused: one kernel for the whole update instead of a few per parameter (1.3-1.6x on the small nets).
    # Except SGD with momentum and a head phase: the backbone's parameters get their first gradient (and
    # momentum buffer) epochs after the head's, in the same group, and fused SGD cannot step a group where
    # only some buffers exist (torch._fused_sgd_ fails on the None); the default implementation starts each
    # buffer at its parameter's first gradient. Adam's per-parameter state is made lazily: fused is safe.
    if cfg.optimizer == "sgd":
        fused = not (cfg.momentum > 0 and cfg.head_epochs > 0 and is_backbone_model(model))
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, eps=cfg.eps, fused=True)


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at a step (0-based) of `total`: linear warmup over warmup_epochs, then
    constant, cosine to 0, or 'onecycle' (linear down to 0: with the warmup, linear up then linear down)."""
    warm = int(cfg.effective_warmup_epochs * steps_per_epoch)     # capped in a run shorter than the warmup
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step + 1 - warm) / max(1, total - warm))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t)


# ---------------------------------------------------------------- the loss

def batch_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(summed loss to train on, summed loss to report, what predicts) for a batch's logits.

    Logits (N, M, K) are M networks trained side by side (airnet's `members`): the loss trained on is the sum
    of the members' own losses, so each member's gradient is the one it would get alone; the loss reported is
    their mean, comparable with a single network's; the prediction is their mean probability.
    `weight`: per-class weights ([train] class_weights): each image's loss times its class's weight, summed
    (then divided by the batch size like any other loss: Keras's class_weight, not torch's weighted mean)."""
    if logits.ndim == 3:
        m = logits.shape[1]
        total = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat_interleave(m), weight=weight,
                                label_smoothing=label_smoothing, reduction="sum")
        return total, total.detach() / m, logits.detach().float().softmax(-1).mean(1)
    loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing, reduction="sum")
    return loss, loss.detach(), logits.detach()


# ---------------------------------------------------------------- the trainer

Split = Batches | Streamed


@dataclass
class Trainer:
    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    seed: int
    # uint8 images -> network input, the run's one definition (None: x/255 only); float inputs (cached
    # features) pass through untouched
    preprocess: Preprocess | None = None
    augmenter: Augmenter | None = None
    # Test-time views (the image's mirror, shifted copies) for the finished model's scores (`tta=True`); the
    # per-epoch validation scores the bare network: no extra passes per epoch, curves comparable across settings.
    test_flip: bool = False
    test_shift: int = 0
    # [train] class_weights (training/weights.py): (K,) weights of the training loss only; the reported training
    # loss is the weighted one, validation and test losses stay unweighted (as Keras's class_weight)
    class_weight: torch.Tensor | None = None
    # [data] sampler = "balanced" (data/sampler.py): each epoch's order from sampler.order(epoch) instead of a
    # permutation; it depends on (seed, epoch) alone, so nothing of it goes into the checkpoint
    sampler: object | None = None

    def __post_init__(self):
        self.preprocess = self.preprocess or Preprocess(0, 0)       # x/255, images as they are
        self.bf16 = use_bf16(self.cfg.precision, self.device)
        # 'auto' on a bf16-capable CPU is measured per model: settled on the first batch's shape.
        self._precision_pending = precision_is_measured(self.cfg.precision, self.device)
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(self.device, torch.float32)
        self.model.to(self.device, memory_format=self.memory_format)
        self.dist = distributed.info()
        if is_backbone_model(self.model):
            self.model.set_backbone_trainable(True)     # every parameter gets its optimizer group
            self.model.bn_frozen = self.cfg.freeze_bn_stats
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.phase = ""
        self.net = self.model                  # DDP wrapper under torchrun (see enter_phase)
        self.scorer = inference_model(self.model, self.test_flip, self.test_shift)     # what tta=True calls
        # Separate streams of randomness, all from the one seed: shuffling (CPU), augmentation (device).
        self.shuffle_gen = torch.Generator().manual_seed(self.seed * 1000 + 1)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + 2)
        self.step = 0                          # optimizer steps, over all phases
        self.epoch = 0                         # epochs completed
        self.history: list[dict] = []
        self.callbacks: list[Callback] = []
        self.stop_training = False
        self.diverged = False
        self.train_size = self.steps_per_epoch = 0

    # -- phases
    def phase_at(self, epoch: int) -> str:
        """'head' for the first head_epochs of a backbone model (backbone frozen), else 'main'."""
        return "head" if epoch < self.cfg.head_epochs and is_backbone_model(self.model) else "main"

    def enter_phase(self, phase: str) -> None:
        """Freeze or unfreeze the backbone. Its parameters keep their optimizer groups: a frozen
        parameter has no gradient, so the optimizer skips it. Under torchrun the DDP wrapper is rebuilt,
        since DDP registers the parameters that require gradients when it is made."""
        if phase == self.phase:
            return
        self.phase = phase
        if is_backbone_model(self.model):
            self.model.set_backbone_trainable(phase != "head")
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    # -- inputs
    def _settle_precision(self, data: Batches) -> None:
        """precision = 'auto' on a CPU with bf16 units: fp32 or bf16, whichever runs this model's training
        step faster here (timed once per CPU and model, see device.use_bf16)."""
        if self._precision_pending and len(data):
            self._precision_pending = False
            sample = self._prepare(data.x[:1], train=False)        # no augmentation: no random numbers drawn
            shape = (min(self.cfg.batch_size, 16), *sample.shape[1:])
            self.bf16 = use_bf16(self.cfg.precision, self.device, self.model, shape, train=True)

    def _prepare(self, xb: torch.Tensor, train: bool, draw: tuple[int, slice] | None = None,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 -> network input. `draw`: (global batch size, this rank's part of it): the augmentation
        draws its random numbers for the whole global batch and applies those of the part. `flip`: which
        images of the batch to mirror, when the flips are not drawn (alternate_flip)."""
        if not train or xb.dtype != torch.uint8:
            return forward.network_input(self.preprocess, xb, self.cfg.channels_last)
        # Training: the augmentation goes between normalizing and sizing (the evaluation path's steps 2 and 3)
        xb = self.preprocess.normalize(xb)
        if self.augmenter is not None and self.augmenter.active:
            xb = self.augmenter(xb, self.aug_gen, draw, flip)
        xb = self.preprocess.to_input_size(xb)
        if self.augmenter is not None:
            side = train_side(self.augmenter.cfg, self.epoch, xb.shape[-1])
            xb = resize(xb, side) if side < xb.shape[-1] else xb
        return layout(xb, self.cfg.channels_last)

    def epoch_flips(self, n: int, perm: torch.Tensor) -> torch.Tensor | None:
        """alternate_flip: whether each image of this epoch's order `perm` is mirrored, on the device. The
        half mirrored in even epochs comes from the seed alone (not the augmentation stream), so a resumed
        run flips exactly as an uninterrupted one."""
        if self.augmenter is None or not (self.augmenter.cfg.hflip and self.augmenter.cfg.alternate_flip):
            return None
        base = torch.rand(n, generator=torch.Generator().manual_seed(self.seed * 1000 + 3)) < 0.5
        return alternating_flips(base, self.epoch)[perm].to(self.device)

    # -- one epoch
    def train_epoch(self, data: Split) -> dict:
        """One pass over the data. Under DDP every rank draws the same permutation and augmentation (same
        seed) and reads, augments and computes only its shard of each global batch; the loss is the shard's
        sum / global batch size, so DDP's gradient average equals the gradient of the global batch mean."""
        model, cfg, opt, world = self.net, self.cfg, self.optimizer, self.dist.world
        self._settle_precision(data)
        model.train()
        n, bs = len(data), cfg.batch_size
        steps = math.ceil(n / bs)
        total_steps = steps * cfg.epochs
        perm = self.sampler.order(self.epoch) if self.sampler else torch.randperm(n, generator=self.shuffle_gen)
        flips = self.epoch_flips(n, perm)
        sizes = [min(bs, n - i * bs) for i in range(steps)]            # global batch sizes
        parts = [self.dist.shard(size) for size in sizes]              # this rank's part of each
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        scheduled = cfg.schedule != "constant" or cfg.warmup_epochs > 0
        batch_hooks = [c for c in self.callbacks if type(c).on_batch_end is not Callback.on_batch_end]
        shards = [slice(i * bs + p.start, i * bs + p.stop) for i, p in enumerate(parts)]
        for i, (xb, yb) in enumerate(data.batches(perm, shards)):
            if scheduled:
                f = lr_factor(cfg, self.step, total_steps, steps)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
            xb = self._prepare(xb, train=True, draw=(sizes[i], parts[i]),
                               flip=None if flips is None else flips[shards[i]])
            with autocast(self.device, self.bf16):
                logits = model(xb)
            train_sum, loss_sum_b, pred = batch_loss(logits, yb, cfg.label_smoothing, self.class_weight)
            loss = train_sum * (world / sizes[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.step += 1
            loss_sum += loss_sum_b.detach()
            correct += (pred.argmax(1) == yb).sum()
            for c in batch_hooks:
                c.on_batch_end(self, sizes[i], loss_sum_b * (world / sizes[i]))     # the reported loss
            threads.on_step()          # a clock read; every few seconds, follows the machine's load
        # One host sync per epoch (plus one all_reduce under DDP).
        distributed.all_reduce_sum(loss_sum, correct)
        return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "lr": opt.param_groups[-1]["lr"]}

    @property
    def scoring(self) -> forward.Scoring:
        """How this run's network is scored (batching, layout, precision): recorded for every later command."""
        return forward.Scoring(self.cfg.eval_batch_size, self.cfg.batch_size, self.cfg.channels_last, self.bf16)

    def predict_logits(self, data: Split, part: slice | None = None, tta: bool = False) -> torch.Tensor:
        """float32 logits (N, K) of a whole split (or of positions `part` of it), on the device, in eval
        mode, batched (models.forward: the one evaluation path); `tta`: averaged over the test-time views."""
        self._settle_precision(data)
        self.model.eval()                      # the model too (the wrapper's mode decides the views)
        return forward.logits(self.scorer if tta else self.model, self.preprocess, data, self.scoring,
                              self.device, part)

    def evaluate(self, data: Split, tta: bool = False) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing, as Keras reports it) and accuracy; sharded under DDP."""
        return self.score(data, tta)[:2]

    @torch.no_grad()
    def score(self, data: Split, tta: bool = False) -> tuple[float, float, torch.Tensor | None]:
        """evaluate(), plus the logits it computed: of the whole split on a single process, None under DDP
        (a rank holds only its shard), so that the final scoring does not run the test views twice."""
        if len(data) == 0:
            return float("nan"), float("nan"), None
        part = self.dist.shard(len(data))          # the whole split on a single process
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        logits = None
        if part.stop > part.start:
            logits, y = self.predict_logits(data, part, tta), data.y[part]
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
        distributed.all_reduce_sum(loss_sum, correct)
        whole = logits is not None and len(logits) == len(data)
        return loss_sum.item() / len(data), correct.item() / len(data), logits if whole else None

    # -- state for checkpoints and resume
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this epoch ended (see `cnnlab run --resume`)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "epoch": self.epoch, "history": self.history,
                "shuffle_gen": self.shuffle_gen.get_state(), "aug_gen": self.aug_gen.get_state().cpu(),
                "torch_rng": torch.get_rng_state(),
                "callbacks": callback_states(self.callbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, kw in zip(self.optimizer.param_groups, impl):   # how to step is this code's choice, not saved state
            g.update(kw)
        self.step, self.epoch, self.history = state["step"], state["epoch"], list(state["history"])
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.aug_gen.set_state(state["aug_gen"].to(self.aug_gen.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        self._callback_states = state.get("callbacks", {})


# ---------------------------------------------------------------- fit

@dataclass
class FitResult:
    history: list[dict]
    stopped_early: bool = False
    diverged: bool = False


def fit(trainer: Trainer, train: Split, val: Split, callbacks: list[Callback] = ()) -> FitResult:
    """Train from trainer.epoch to cfg.epochs, validating each epoch, calling the callbacks' hooks.

    Stops early when a callback sets trainer.stop_training, or when the training loss becomes NaN or
    infinite (trainer.diverged; the run is then reported as diverged).
    """
    trainer.callbacks = list(callbacks)
    restore_states(trainer.callbacks, getattr(trainer, "_callback_states", None))   # by state_key, after a resume
    trainer.train_size, trainer.steps_per_epoch = len(train), math.ceil(len(train) / trainer.cfg.batch_size)
    trainer.stop_training = trainer.diverged = False
    threads.configure(trainer.model, trainer.device, trainer.cfg.threads, trainer.cfg.deterministic)
    try:
        for c in trainer.callbacks:
            c.on_fit_start(trainer)
        while trainer.epoch < trainer.cfg.epochs and not trainer.stop_training:
            trainer.enter_phase(trainer.phase_at(trainer.epoch))
            for c in trainer.callbacks:
                c.on_epoch_start(trainer)
            t0 = time.perf_counter()
            logs = trainer.train_epoch(train)
            if len(val):
                logs["val_loss"], logs["val_accuracy"] = trainer.evaluate(val)
            logs = {"epoch": trainer.epoch + 1, **logs, "seconds": time.perf_counter() - t0,
                    "threads": threads.epoch_threads()}          # what the run folder records of them
            trainer.history.append(logs)
            trainer.epoch += 1
            threads.on_epoch_end(trainer.model, logs["seconds"])
            if not math.isfinite(logs["loss"]):
                trainer.diverged = trainer.stop_training = True
            for c in trainer.callbacks:
                c.on_epoch_end(trainer, logs)
    except BaseException as e:
        for c in trainer.callbacks:
            c.on_exception(trainer, e)
        raise
    stopped_early = trainer.stop_training and not trainer.diverged
    for c in trainer.callbacks:
        c.on_fit_end(trainer)
    return FitResult(trainer.history, stopped_early=stopped_early, diverged=trainer.diverged)
