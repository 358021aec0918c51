"""Linear probe, then fine-tune (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution").

Why. A fine-tuning run that starts from a random head sends large, random gradients into the pretrained
backbone in its first steps, and the features it came for are partly destroyed before the head has learnt
to use them. cnnlab's first recipe trained the head alone for 2 epochs first (`head_epochs`): each of those
epochs is a full backbone forward over augmented images, and two SGD epochs left the head far from
converged (about 37% validation accuracy on CUB with an ImageNet backbone, while the same head trained to
convergence on frozen features scores twice that).

What. `[train] probe_epochs = N`: before the first epoch, the head is trained to convergence on the
backbone's frozen features of the training split: the centre view, from the same feature cache the frozen
runs use, so it costs one forward pass over the training images the first time and seconds after that.
Adam 1e-3, batch 64, the run's label smoothing, at most N epochs, early stopping on the validation loss
(patience 10; the loss, not the accuracy: on a few hundred validation images the accuracy stalls for many
epochs while the head is still improving) restoring the best epoch. Fine-tuning then starts from that head, typically with a small
backbone learning rate (`backbone_lr_mult`), so the backbone moves only as far as the task needs.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from cnnlab.training.callbacks import EarlyStopping
from cnnlab.config import TrainConfig
from cnnlab.training.engine import Batches, Trainer, fit
from cnnlab.wording import plural

PROBE_LR = 1e-3
PROBE_BATCH = 64
PROBE_PATIENCE = 10


def probe_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, tr_idx: torch.Tensor, va_idx: torch.Tensor,
               cfg: TrainConfig, seed: int, device: torch.device, quiet: bool) -> dict:
    """Train `head` in place on features x (N, D) with labels y (the training and validation splits given by
    their indices); returns what results.json records of it ("probe": epochs, val metrics, seconds)."""
    t0 = time.perf_counter()
    train = Batches(x[tr_idx].to(device), y[tr_idx].to(device))
    val = Batches(x[va_idx].to(device), y[va_idx].to(device))
    pcfg = TrainConfig(optimizer="adam", lr=PROBE_LR, batch_size=min(PROBE_BATCH, len(train)),
                       epochs=cfg.probe_epochs, label_smoothing=cfg.label_smoothing, precision="fp32")
    stop = [EarlyStopping("val_loss", patience=PROBE_PATIENCE, restore_best_weights=True)] if len(val) else []
    trainer = Trainer(head, pcfg, device, seed)
    fit(trainer, train, val, stop)
    val_loss, val_acc = trainer.evaluate(val) if len(val) else (math.nan, math.nan)
    seconds = time.perf_counter() - t0
    if not quiet:
        print(f"linear probe: {plural(trainer.epoch, 'epoch')} on cached frozen features, val_accuracy {val_acc:.4f} "
              f"({seconds:.1f}s); fine-tuning starts from this head")
    return {"probe": {"epochs": trainer.epoch, "val_accuracy": val_acc, "val_loss": val_loss,
                      "seconds": round(seconds, 3)}}
