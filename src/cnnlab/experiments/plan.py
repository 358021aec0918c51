"""The plan of a run: everything `train` (experiments/run.py) needs and the run folder records, and the steps
that make it (the normalizer, the splits on the device, the split warnings). `prepare` (experiments/prepare.py)
makes one from a config; the frozen-feature recipe (experiments/frozen.py) transforms one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnlab.config import Config, DataConfig, TrainConfig
from cnnlab.data import Dataset, load_dataset
from cnnlab.data.preprocess import Normalizer, Preprocess
from cnnlab.data.stream import memory_budget, place, rows_of
from cnnlab.errors import ConfigError
from cnnlab.models.parts import is_backbone_model
from cnnlab.runtime import distributed
from cnnlab.training.engine import Split


@dataclass
class Splits:
    train: Split                    # on the device, or streamed when over [data] memory_budget_mb
    val: Split
    test: Split


@dataclass
class Plan:
    cfg: Config                     # the config as the user gave it: never replaced (chosen values: `chosen`)
    source: str                     # where it came from, for messages
    device: torch.device
    data: Dataset                   # the images; after the frozen recipe, the backbone's features
    model: nn.Module                # the whole network: what the run folder rebuilds
    trained: nn.Module              # what the optimizer trains: the model, or its head on cached features
    preprocess: Preprocess          # uint8 images -> network input: the one definition every path uses
    size: int                       # the side of what the network sees, in pixels
    tr_idx: torch.Tensor            # the training and validation split, as indices into data's training set
    va_idx: torch.Tensor
    table: str                      # the layer table (summary.txt)
    test_images: torch.Tensor       # the test images (errors.png), also when features replaced them
    splits: Splits | None = None
    chosen: dict = field(default_factory=dict)     # [train] values chosen during the run ([search])
    notes: list[str] = field(default_factory=list)  # warnings: printed, and kept in results.json
    extra: dict = field(default_factory=dict)      # results.json extras (probe, search, feature cache)
    solved: bool = False            # the trained module was fitted in closed form ([search] C): no epochs to run

    @property
    def train_config(self) -> TrainConfig:
        """The [train] table the trainer uses: the user's, with the values chosen on validation (no epochs for
        a head already solved)."""
        return dataclasses.replace(self.cfg.train, **self.chosen, **({"epochs": 0} if self.solved else {}))

    @property
    def frozen(self) -> bool:
        """The head trains on cached features; the checkpoints hold the head, backbone.pt the backbone."""
        return self.trained is not self.model

    @property
    def identity(self) -> dict:
        """What a checkpoint belongs to; compared on resume so a swapped file gives a clear error."""
        return {"config": self.cfg.name, "model": self.cfg.model.name, "num_classes": self.data.num_classes,
                "freeze_backbone": self.frozen}


class DataCache:
    """Data sets loaded once per process and shared by suite rows with the same [data] table."""

    def __init__(self):
        self._cache: dict[str, Dataset] = {}

    def get(self, cfg: DataConfig, quiet: bool) -> Dataset:
        # The validation split and the device placement come after loading: rows that differ only there
        # share the loaded data.
        later = ("val_fraction", "val_split", "memory_budget_mb", "sampler")
        key = repr(sorted((k, v) for k, v in vars(cfg).items() if k not in later))
        if key not in self._cache:
            self._cache = {key: load_dataset(cfg, quiet=quiet)}   # keep one: data sets can be large
        return self._cache[key]


def choose_normalizer(mode: str, x_train: torch.Tensor, backbone_norm: Normalizer | None, source: str) -> Normalizer:
    """[train] normalize: featurewise statistics of the training split, the backbone's own, or none."""
    if mode == "featurewise":
        return Normalizer.fit(x_train)
    if mode == "backbone" and backbone_norm is None:
        raise ConfigError(f"{source}: [train] normalize = 'backbone' needs a backbone model (timm, tv: or package.module:fn)")
    if mode in ("backbone", "auto") and backbone_norm is not None:
        return backbone_norm
    return Normalizer()


def place_splits(plan: Plan, quiet: bool = False) -> Splits:
    """Each split of plan.data onto the device while [data] memory_budget_mb lasts (train first), the rest
    streamed."""
    ds, tr, va = plan.data, plan.tr_idx, plan.va_idx
    train, test = ds.files.get("x_train"), ds.files.get("x_test")
    placed = place({"train": (rows_of(ds.x_train, train, tr), ds.y_train[tr]),
                    "val": (rows_of(ds.x_train, train, va), ds.y_train[va]),
                    "test": (rows_of(ds.x_test, test), ds.y_test)},
                   plan.device, memory_budget(plan.cfg.data.memory_budget_mb, plan.device),
                   None if quiet or not distributed.info().is_main else print)
    return Splits(placed["train"], placed["val"], placed["test"])


def split_warnings(ds: Dataset, tr: torch.Tensor, va: torch.Tensor, cfg: DataConfig) -> list[str]:
    """One line when the validation split leaves classes without training (or validation) images."""
    counts = lambda idx: torch.bincount(ds.y_train[idx], minlength=ds.num_classes)  # noqa: E731
    notes = []
    n_tr, n_va = counts(tr), counts(va)
    no_train = [ds.classes[k] for k in torch.nonzero((n_tr == 0) & (n_va > 0)).flatten().tolist()]
    if no_train:
        notes.append(f"{len(no_train)} of {ds.num_classes} classes have no training images "
                     f"({', '.join(no_train[:5])}{', ...' if len(no_train) > 5 else ''}): [data] val_split = "
                     f"{cfg.val_split!r} holds out whole classes when records are sorted by class; their test "
                     f"images can never be right. Use val_split = 'stratified' unless reproducing that on purpose")
    if cfg.val_fraction > 0 and len(va):
        no_val = int(((n_va == 0) & (n_tr > 0)).sum())
        if no_val and not no_train:
            notes.append(f"{no_val} of {ds.num_classes} classes have no validation images ([data] val_split = "
                         f"{cfg.val_split!r}); validation accuracy does not cover them")
    return notes


def backbone_of(plan: Plan, what: str) -> nn.Module:
    """The plan's backbone, or one clear error naming the config key that needs one."""
    if not is_backbone_model(plan.model):
        raise ConfigError(f"{plan.source}: {what} needs a backbone model (timm, tv: or package.module:fn), "
                          f"not {plan.cfg.model.name!r}")
    return plan.model.backbone
