"""Experiment configs: TOML files -> typed, validated dataclasses.

A config has a few top-level keys (name, seed, ...) and one table per part of the pipeline. Each part
of the code receives only its own table (`cfg.data`, `cfg.train`, ...). A choice is typed as a
`Literal[...]`, so the one type check below also checks it; each table then checks its own ranges
(`check`), and `Config.check` the few rules that span two tables. An unknown key, a wrong type or an
out-of-range value raises ConfigError naming the key and the file. Validation never fills a value in:
an omitted `lr` stays None and means "the optimizer's Keras default", applied where the optimizer is made.

A config may start from another: `base = "practice/08_bnpre"` (a packaged name, or a path relative to
the file) is read first and the file's tables are merged over it key by key (`name` is never inherited).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnnlab.errors import ConfigError

Monitor = Literal["loss", "accuracy", "val_loss", "val_accuracy"]
Override = tuple[str, Any]          # ("train.epochs", 5): a typed --set


def _check(cond: bool, where: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: '{key}' {msg}")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder name inside the runs folder (run and suite folders are named after it),
    or None. Names come from config files that users send each other: '../x' or '/tmp/x' would write elsewhere."""
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if "/" in name or "\\" in name:
        return "must be one folder name, without / or \\"
    if name.startswith("."):
        return "must not start with a dot ('..' leaves the runs folder, '.x' hides the run)"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "must not hold control characters (tab, newline, ...)"
    if len(name.encode()) > 200:
        return "must be at most 200 bytes long (the run folder adds a time stamp)"
    return None


@dataclass
class DataConfig:
    source: str = "cifar100"          # cifar100 | cifar10 | imagefolder | synthetic | cub200-2010 | cub200-2011
    data_dir: str = ""                # "" -> $CNNLAB_DATA or ~/.cache/cnnlab/data
    classes: int | list = 25          # first N classes, or a list of class indices / names; 0 = all
    max_train_per_class: int | list[int] = 0   # first N train images of each class, in record order (0 = all);
                                      # a list: one cap per selected class (a deliberately imbalanced set)
    max_test_per_class: int = 0
    val_fraction: float = 0.1         # held out from train for validation
    val_split: Literal["stratified", "random", "last", "first"] = "stratified"
    image_size: int = 0               # resize (shorter side + center crop) for JPEG sources; 0 = source default
    # imagefolder: a CSV (.tsv: tab) of path,label[,split] rows, relative to data_dir; paths relative to it
    labels: str = ""
    # imagefolder with one folder of class folders, or labels without a split column: the test split's
    # fraction, stratified and seeded by split_seed (not the run's seed: every seed tests on the same images)
    test_fraction: float = 0.2
    split_seed: int = 0
    download: bool = True             # download official archives when missing (needs internet)
    skip_corrupt: bool = False        # skip unreadable images with a warning instead of failing
    # MB the splits may take on the training device (RAM on a CPU); a split beyond it is streamed from its
    # file batch by batch. 0 = half of the free memory (host RAM / GPU memory), shared by a machine's processes
    memory_budget_mb: int = 0
    synthetic_train: int = 2000       # synthetic source only: images per split
    synthetic_test: int = 500
    # the order of each training epoch: "shuffle" (a permutation), or "balanced" (every class drawn equally
    # often, small classes repeated; from the seed and epoch alone, so a resumed run draws the same; data/sampler.py)
    sampler: Literal["shuffle", "balanced"] = "shuffle"

    def check(self, w: str) -> None:
        _check(0.0 <= self.val_fraction < 1.0, w, "val_fraction", f"must be in [0, 1); got {self.val_fraction}")
        _check(0.0 < self.test_fraction < 1.0, w, "test_fraction", f"must be in (0, 1); got {self.test_fraction}")
        _check(self.split_seed >= 0, w, "split_seed", "must be >= 0")
        caps = self.max_train_per_class
        _check(all(c >= 0 for c in (caps if isinstance(caps, list) else [caps])), w, "max_train_per_class",
               "must be >= 0 (0 = all), or a list of one such cap per selected class")
        _check(not isinstance(caps, list) or len(caps) > 0, w, "max_train_per_class", "must not be an empty list")
        for key in ("max_test_per_class", "image_size", "memory_budget_mb"):
            _check(getattr(self, key) >= 0, w, key, "must be >= 0")
        for key in ("synthetic_train", "synthetic_test"):
            _check(getattr(self, key) > 0, w, key, "must be > 0")
        if isinstance(self.classes, int):
            _check(self.classes >= 0, w, "classes", "must be >= 0 (0 = all classes) or a list")
        else:
            _check(len(self.classes) > 0, w, "classes", "must not be an empty list")
            _check(all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in self.classes), w, "classes",
                   "must list class indices or class names")


@dataclass
class ModelConfig:
    name: str = "basenet"             # a registered model (`cnnlab models`), a timm/torchvision name, or pkg.mod:fn
    weights: str = ""                 # backbones: "" (default pretrained tag), a tag, a local file, or "none"
    head: list = field(default_factory=list)    # hidden sizes of the dense head on a backbone, e.g. [400]
    input_size: int = 0               # backbones: image size the network sees (0 = the weights' default, e.g. 224)
    args: dict = field(default_factory=dict)    # extra keyword arguments for the model function
    # backbones: input mean/std per RGB channel of x/255, replacing the backbone's own (timm, tv:, or what a
    # custom backbone declares in its `pretrained_cfg`); [] = the backbone's own
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # frozen backbones ([train] freeze_backbone): features = the mean of the image's and its mirror's (cached
    # per view; the rebuilt model averages both views too)
    flip_average: bool = False
    # frozen backbones: the head first standardizes each feature with the training split's mean/std (kept in
    # the head's checkpoint, so the rebuilt model applies them)
    standardize_features: bool = False
    # package.module:function: what the function returns. auto: a whole classifier when it takes num_classes
    # (built and fed as cnnlab's registered nets), else a backbone (pooled features; cnnlab adds the head)
    kind: Literal["auto", "classifier", "backbone"] = "auto"
    # a module imported before `name` is looked up, for its @register_model functions (e.g. "mynets")
    module: str = ""
    # a network as Keras layer calls, e.g. ["Conv2D(6, 5)", "ReLU()", "MaxPooling2D(2)", "Flatten()"]
    # (models/layers.py); when given it is the model, and `name` only labels it
    layers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """What results and reports call the model: `name`, or "layers" for a layer list under the default name."""
        return "layers" if self.layers and self.name == "basenet" else self.name

    def check(self, w: str) -> None:
        if self.layers:        # parsed here: a bad layer fails before any data is read
            from cnnlab.models.layers import check_model_config
            check_model_config(self, w)
        _check(self.input_size >= 0, w, "input_size", "must be >= 0")
        _check(all(isinstance(h, int) and h > 0 for h in self.head), w, "head", "must list positive layer sizes, e.g. [400]")
        _check(len(self.mean) in (0, 3), w, "mean", f"must list 3 numbers (R, G, B), or [] for the backbone's own; got {self.mean}")
        _check(len(self.std) in (0, 3) and all(s > 0 for s in self.std), w, "std",
               f"must list 3 positive numbers (R, G, B), or [] for the backbone's own; got {self.std}")


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float | None = None           # omitted -> the optimizer's Keras default (sgd 0.01, adam 0.001)
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # false: no weight decay on BatchNorm weights and biases (as timm, torchvision)
    eps: float = 1e-7                 # Adam epsilon (Keras default)
    epochs: int = 20                  # all epochs, the head-only ones (head_epochs) included
    batch_size: int = 64
    eval_batch_size: int = 500        # for 32x32 inputs; larger inputs: proportionally fewer (>= batch_size)
    label_smoothing: float = 0.0
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"   # onecycle: linear up (warmup), linear down
    warmup_epochs: float = 0.0        # not shorter than the run (a shortened recipe): half the run, with a note
    # auto: a backbone's own mean/std, none for cnnlab's models | none: x/255 only | featurewise: per-channel
    # mean/std of the training split | backbone: the backbone's own mean/std
    normalize: Literal["auto", "none", "featurewise", "backbone"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast where the GPU/CPU has fast bf16
    channels_last: bool = True
    freeze_backbone: bool = False     # train only the head (features computed once and cached)
    head_epochs: int = 0              # fine-tuning: the first epochs train the head alone (backbone frozen)
    backbone_lr_mult: float = 1.0     # fine-tuning: backbone lr = lr * this
    freeze_bn_stats: bool = False     # fine-tuning: the backbone's BatchNorm layers keep their pretrained statistics
    probe_epochs: int = 0             # fine-tuning: first train the head on cached frozen features (linear probe, at most this many epochs)
    checkpoint_every: int = 1         # epochs between 'last' checkpoints
    # CPU threads: 0 = the cores other processes leave free, followed during the run (cnnlab.runtime.threads);
    # N = N threads for the whole run
    threads: int = 0
    # the same numbers at any load: one fixed thread count (threads, else the process's own) and torch's
    # deterministic algorithms (`--deterministic`; on GPU see the README's Reproducibility)
    deterministic: bool = False
    # weights of the classes in the training loss: "none", "balanced" (scikit-learn's n / (classes * count),
    # from the training split), or one weight per class; validation and test losses stay unweighted
    class_weights: str | list[float] = "none"

    @property
    def effective_lr(self) -> float:
        """lr, or the optimizer's Keras default when omitted."""
        return self.lr if self.lr is not None else default_lr(self.optimizer)

    @property
    def effective_warmup_epochs(self) -> float:
        """warmup_epochs, or half the run when the run is not longer than the warmup (a recipe shortened with
        --set train.epochs=N): the warmup still leads into the schedule. notes() says so."""
        return self.warmup_epochs if self.warmup_epochs < self.epochs else self.epochs / 2

    def notes(self) -> list[str]:
        """One line for each value the run uses instead of the one given (printed at its start, kept in
        results.json warnings)."""
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            return [f"[train] warmup_epochs = {self.warmup_epochs:g} is not shorter than the run (epochs = "
                    f"{self.epochs}): warming up over half of it ({self.effective_warmup_epochs:g} "
                    f"epoch{'' if self.effective_warmup_epochs == 1 else 's'}) instead"]
        return []

    def check(self, w: str) -> None:
        _check(self.lr is None or self.lr > 0, w, "lr", f"must be > 0 (omit it for the optimizer's Keras default); got {self.lr}")
        _check(self.epochs >= 1, w, "epochs", f"must be >= 1; got {self.epochs}")
        _check(self.batch_size >= 1, w, "batch_size", f"must be >= 1; got {self.batch_size}")
        _check(self.eval_batch_size >= 1, w, "eval_batch_size", "must be >= 1")
        _check(0.0 <= self.momentum < 1.0, w, "momentum", f"must be in [0, 1); got {self.momentum}")
        _check(self.weight_decay >= 0, w, "weight_decay", "must be >= 0")
        _check(self.eps > 0, w, "eps", "must be > 0")
        _check(0.0 <= self.label_smoothing < 1.0, w, "label_smoothing", "must be in [0, 1)")
        _check(self.warmup_epochs >= 0, w, "warmup_epochs", f"must be >= 0; got {self.warmup_epochs}")
        _check(0 <= self.head_epochs <= self.epochs, w, "head_epochs",
               f"must be in [0, epochs] (epochs = {self.epochs} counts the head-only epochs too); got "
               f"{self.head_epochs}: lower it, e.g. --set train.head_epochs={self.epochs // 2}")
        _check(self.backbone_lr_mult >= 0, w, "backbone_lr_mult", "must be >= 0")
        _check(self.probe_epochs >= 0, w, "probe_epochs", "must be >= 0 (0: no linear probe)")
        _check(not (self.probe_epochs and self.freeze_backbone), w, "probe_epochs",
               "is for fine-tuning; with freeze_backbone = true the run itself trains the head on the frozen features")
        _check(self.checkpoint_every >= 1, w, "checkpoint_every", "must be >= 1")
        _check(self.threads >= 0, w, "threads", f"must be >= 0 (0 = follow the machine's load); got {self.threads}")
        cw = self.class_weights
        _check(cw in ("none", "balanced") if isinstance(cw, str) else bool(cw) and all(v >= 0 for v in cw)
               and any(v > 0 for v in cw), w, "class_weights",
               f"must be \"none\", \"balanced\" or a list of one weight >= 0 per class (not all 0); got {cw!r}")


@dataclass
class AugmentConfig:
    zoom: float = 0.0                 # Keras zoom_range: x and y zoom drawn independently in [1-z, 1+z]
    hflip: bool = False               # random horizontal flip, p = 0.5
    # airbench's alternating flip (with hflip): a random half of the training images (fixed by the seed) is
    # mirrored in even epochs, the other half in odd ones, instead of a fresh coin per image and epoch.
    alternate_flip: bool = False
    crop_padding: int = 0             # random crop after reflect padding (0 = off)
    cutout: int = 0                   # side of a square zeroed at a random place in each image (0 = off)
    random_resized_crop: bool = False  # Inception-style crop (scale rrc_min_scale..1) for large images
    rrc_min_scale: float = 0.08
    eval_crop: float = 0.875          # large images: center crop fraction at evaluation / feature extraction
    # Test-time augmentation of the finished model (test scores, `cnnlab evaluate`, predict, export): the mean
    # of the logits of the image and its mirror (test_flip), and of both moved diagonally by +-test_shift
    # pixels (reflect padding; 1 is airbench's choice for 32x32 images). Training is unchanged, and so is the
    # per-epoch validation (the bare network: no extra passes each epoch). Costs 2x / 6x the forward passes.
    test_flip: bool = False
    test_shift: int = 0
    # Progressive resizing (fast.ai, FFCV): the first epochs train on smaller images, a step costing about
    # (side / full side)^2 of a full-size one, so more epochs fit in the same time. The side grows linearly
    # from resize_from pixels at the first epoch to the full size at epoch resize_until (1-based; from then
    # on full size), in multiples of 8 pixels. Evaluation, validation included, is always at full size.
    resize_from: int = 0              # 0 = off
    resize_until: int = 0

    def check(self, w: str) -> None:
        _check(0.0 <= self.zoom < 1.0, w, "zoom", f"must be in [0, 1); got {self.zoom}")
        _check(self.crop_padding >= 0, w, "crop_padding", "must be >= 0")
        _check(self.hflip or not self.alternate_flip, w, "alternate_flip", "needs hflip = true (it decides how "
               "images are flipped, not whether)")
        _check(self.cutout >= 0, w, "cutout", f"must be a side in pixels, >= 0; got {self.cutout}")
        _check(0 <= self.test_shift <= 8, w, "test_shift", f"must be a pixel count from 0 to 8; got {self.test_shift}")
        _check(0.0 < self.rrc_min_scale <= 1.0, w, "rrc_min_scale", "must be in (0, 1]")
        _check(0.0 < self.eval_crop <= 1.0, w, "eval_crop", "must be in (0, 1]")
        _check(self.resize_from >= 0, w, "resize_from", f"must be a side in pixels, >= 0 (0 = off); got {self.resize_from}")
        _check(not self.resize_from or self.resize_until >= 1, w, "resize_until",
               f"must be the epoch (>= 1) by which training reaches full size when resize_from is set; got {self.resize_until}")


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: Monitor = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False
    start_from_epoch: int = 0
    baseline: float = float("nan")    # nan = none

    def check(self, w: str) -> None:
        _check(self.patience >= 0, w, "patience", "must be >= 0")
        _check(self.min_delta >= 0, w, "min_delta", "must be >= 0 (Keras uses its absolute value)")
        _check(self.start_from_epoch >= 0, w, "start_from_epoch", "must be >= 0")


@dataclass
class CheckpointConfig:
    """What `best.pt` and `best_epoch` mean when early stopping is off (when it is on, its monitor decides)."""
    monitor: Monitor = "val_accuracy"
    mode: Literal["auto", "min", "max"] = "max"

    def check(self, w: str) -> None:
        pass


@dataclass
class SearchConfig:
    """Frozen-backbone runs: head hyper-parameters chosen on the validation split. Every combination of the
    listed values trains the head on the cached features (seconds each); the run then trains with the best by
    its monitor (early stopping's, else [checkpoint]'s, taken on the validation split). [] = the [train] value."""
    weight_decay: list[float] = field(default_factory=list)
    label_smoothing: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    # instead of a grid: the linear head fitted as scikit-learn's LogisticRegression (multinomial, L2, L-BFGS to
    # convergence) on the whole training split, its inverse penalty C chosen among these by stratified
    # cv_folds-fold cross-validation, then refitted on every training image (transfer/logistic.py)
    C: list[float] = field(default_factory=list)
    cv_folds: int = 5

    def grid(self) -> list[dict]:
        """Every combination of the listed values as {key: value}; [] when nothing is listed."""
        keys = [k for k in ("weight_decay", "label_smoothing", "lr") if getattr(self, k)]
        combos = itertools.product(*(getattr(self, k) for k in keys))
        return [{k: float(v) for k, v in zip(keys, c)} for c in combos] if keys else []

    def check(self, w: str) -> None:
        _check(all(v >= 0 for v in self.weight_decay), w, "weight_decay", "values must be >= 0")
        _check(all(0 <= v < 1 for v in self.label_smoothing), w, "label_smoothing", "values must be in [0, 1)")
        _check(all(v > 0 for v in self.lr), w, "lr", "values must be > 0")
        _check(all(v > 0 for v in self.C), w, "C", "values must be > 0 (the inverse of the L2 penalty)")
        _check(self.cv_folds >= 2, w, "cv_folds", "must be at least 2")
        _check(not (self.C and self.grid()), w, "C", "fits the head in closed form: it cannot be combined with a "
               "weight_decay / label_smoothing / lr grid (the penalty is C; keep one of the two)")


@dataclass
class ReportConfig:
    label: str = ""                   # row label in the report
    reference_accuracy: float = float("nan")  # the practice's own reported test accuracy for this row
    reference_loss: float = float("nan")

    def check(self, w: str) -> None:
        pass


@dataclass
class TrackingConfig:
    loggers: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)  # besides the run folder
    mlflow_uri: str = ""              # "" -> $MLFLOW_TRACKING_URI, else a local store in <runs dir>/mlruns

    def check(self, w: str) -> None:
        pass


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    seeds: int = 1                    # run with seeds seed, seed+1, ... (the report gives mean ± std and tests)
    # cross-validation: K runs, fold i validating on the i-th of K stratified parts of the training split
    # (the seed fixes the parts; experiments/folds.py); 0 = the usual [data] val_fraction hold-out
    folds: int = 0
    fold: int = 0                     # which fold this run is (1..folds); 0 with folds = K: run all K
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def notes(self) -> list[str]:
        """One line for each value a run of this config uses instead of the one given (TrainConfig.notes)."""
        return self.train.notes()

    def check(self, where: str) -> None:
        """Each table's own checks, then the rules that span tables."""
        problem = name_problem(self.name)
        _check(problem is None, where, "name", f"{problem}; got {self.name!r} (e.g. name = \"resnet-cub\")")
        _check(self.seed >= 0, where, "seed", "must be >= 0")
        _check(self.seeds >= 1, where, "seeds", "must be >= 1")
        _check(self.folds == 0 or self.folds >= 2, where, "folds", f"must be 0 (no cross-validation) or >= 2; got {self.folds}")
        _check(0 <= self.fold <= self.folds, where, "fold", f"must be in 0..folds ({self.folds}); got {self.fold}")
        _check(not self.folds or self.data.val_fraction > 0, where, "folds",
               f"= {self.folds} validates on each fold in turn, but [data] val_fraction = 0 asks for no validation "
               f"split; remove val_fraction = 0 (folds replace it) or run without --folds")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), where, "device",
               f"must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        for name in SECTIONS:
            getattr(self, name).check(f"{where}: [{name}]")
        es = self.early_stopping
        if es.enabled and es.monitor.startswith("val_"):
            _check(self.data.val_fraction > 0, f"{where}: [early_stopping]", "monitor",
                   f"is {es.monitor!r} but [data] val_fraction = 0 gives no validation split")
        a = self.augment
        if a.random_resized_crop and (a.zoom or a.crop_padding):
            raise ConfigError(f"{where}: [augment] random_resized_crop already draws the scale and position of each "
                              f"view; it cannot be combined with zoom or crop_padding (set those to 0)")
        self._check_frozen_recipe(where)

    def _check_frozen_recipe(self, where: str) -> None:
        """The frozen-feature recipe's keys work on cached features: with a trainable backbone the features
        change every step, and each search trial would be a whole training run."""
        keys = [f"[model] {k}" for k in ("flip_average", "standardize_features") if getattr(self.model, k)]
        keys += ["[search]"] if self.search.grid() or self.search.C else []
        if self.search.C and self.model.head:
            raise ConfigError(f"{where}: [search] C fits a linear head (logistic regression), but [model] head = "
                              f"{self.model.head}: set head = [] or remove C")
        if (self.augment.test_flip or self.augment.test_shift) and self.train.freeze_backbone:
            key = "test_flip" if self.augment.test_flip else "test_shift"
            raise ConfigError(f"{where}: [augment] {key} does not apply to frozen-backbone runs, which are "
                              f"scored on cached features; use [model] flip_average = true (both views' features "
                              f"averaged, in training and at test time)")
        if self.augment.resize_from and self.train.freeze_backbone:
            raise ConfigError(f"{where}: [augment] resize_from (progressive resizing) does not apply to frozen-backbone "
                              f"runs, which train the head on features extracted once at full size; remove it")
        if keys and not self.train.freeze_backbone:
            raise ConfigError(f"{where}: {' and '.join(keys)} {'needs' if len(keys) == 1 else 'need'} [train] "
                              f"freeze_backbone = true: the frozen-feature recipe works on the backbone's cached "
                              f"features (with a trainable backbone they change every step, and each search "
                              f"trial would retrain the whole network)")
        if self.search.grid() and self.data.val_fraction == 0:
            raise ConfigError(f"{where}: [search] chooses on the validation split, but [data] val_fraction = 0 "
                              f"gives none")


# Field types are strings under postponed annotations; resolve them once.
_HINTS = typing.get_type_hints(Config)
SECTIONS = {name: tp for name, tp in _HINTS.items() if dataclasses.is_dataclass(tp)}


# ---------------------------------------------------------------- type checking

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp) if t is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return f"list of {item}s" if item in ("integer", "number", "string") else f"list of {item}"
    return {int: "integer", float: "number", bool: "true or false", str: "string", list: "list", dict: "table"}.get(tp, str(tp))


def _set_field(obj: Any, key: str, value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{where}: unknown key '{key}' (known keys: {known})")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: '{key}' is a table; write [{key}] or {key}.<key> = value")
    if not _type_ok(value, tp):
        name = _type_name(tp)
        article = "" if typing.get_origin(tp) is Literal or tp is bool else "an " if name[0] in "aeiou" else "a "
        raise ConfigError(f"{where}: '{key}' must be {article}{name}, got {value!r}")
    if tp is float or (isinstance(value, int) and not isinstance(value, bool) and _type_ok(1.5, tp)):
        value = float(value)
    setattr(obj, key, value)


# Tables another command reads from the same file, not part of a run: [tune] is `cnnlab tune`'s search space
# (cnnlab.tuning.space checks it); `cnnlab run` trains the config's own values and leaves it alone.
COMMAND_TABLES = ("tune",)


def apply_dict(cfg: Config, raw: dict, source: str) -> Config:
    """Apply a parsed TOML document onto cfg (in place) with full type checking."""
    for key, value in raw.items():
        if key in COMMAND_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a table ([{key}])")
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a table ([{key}])")
            section = getattr(cfg, key)
            for sub, v in value.items():
                _set_field(section, sub, v, f"{source}: [{key}]")
        else:
            _set_field(cfg, key, value, source)
    return cfg


# ---------------------------------------------------------------- overrides

def parse_set(item: str) -> Override:
    """`--set KEY=VALUE`: the value is parsed as TOML when it is valid TOML, else kept as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: list[Override | str]) -> Config:
    """Typed overrides, in order: ("train.epochs", 5), or `--set` strings such as "data.classes=[0,1,2]"."""
    for item in overrides:
        key, value = parse_set(item) if isinstance(item, str) else item
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"--set {key}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
            _set_field(getattr(cfg, section), sub, value, f"--set [{section}]")
        else:
            _set_field(cfg, key, value, "--set")
    return cfg


# ---------------------------------------------------------------- files

def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def read_data_preset(name_or_path: str | None) -> tuple[dict, str] | None:
    """A data preset (`--data cifar10s`, or a TOML file whose [data] keys win): (its tables, where it came from);
    None when none is given. The one reader, for the CLI, suites, `cnnlab evaluate` and the Python API."""
    if not name_or_path:
        return None
    from cnnlab.configs import data_preset
    path = data_preset(name_or_path)
    return read_toml(path), str(path)


def read_with_base(path: str | Path, _seen: tuple = ()) -> dict:
    """A config file's tables merged over those of its `base` chain (key by key; `name` not inherited)."""
    path = Path(path)
    raw = read_toml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a string naming a config, got {base!r}")
    base_path = _resolve_base(base, path)
    if base_path.resolve() in _seen:
        raise ConfigError(f"{path}: base = {base!r} makes a cycle of configs")
    merged = read_with_base(base_path, _seen + (path.resolve(),))
    merged.pop("name", None)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _resolve_base(base: str, including: Path) -> Path:
    for cand in (including.parent / base, including.parent / f"{base}.toml"):
        # a file never bases itself: `best.toml` with base = "best" means the packaged recipe of that name
        if cand.is_file() and cand.resolve() != including.resolve():
            return cand
    from cnnlab.configs import config_file
    try:
        return config_file(base)
    except ConfigError:
        raise ConfigError(f"{including}: base = {base!r} is neither a file beside it nor a packaged config "
                          f"(`cnnlab configs` lists them)") from None


def load_config(path: str | Path, overrides: list[Override | str] = (),
                data_preset: tuple[dict, str] | None = None) -> Config:
    """Read a config file (and its base), then an optional data preset (its [data] keys win), then overrides."""
    cfg = Config()
    raw = read_with_base(path)
    apply_dict(cfg, raw, str(path))
    if data_preset is not None:
        preset, preset_source = data_preset
        apply_dict(cfg, {"data": preset.get("data", {})}, preset_source)
    apply_overrides(cfg, list(overrides))
    cfg.check(str(path))
    if cfg.name == "experiment" and "name" not in raw:
        cfg.name = Path(path).stem
    return cfg


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = apply_dict(Config(), copy.deepcopy(raw), source)
    cfg.check(source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain dict for TOML/JSON; unset values (None, NaN) are dropped since TOML has neither."""
    def clean(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = clean(v)
            elif v is not None and not (isinstance(v, float) and v != v):
                out[k] = v
        return out
    return clean(dataclasses.asdict(cfg))


def default_lr(optimizer: str) -> float:
    """Keras's defaults: SGD 0.01, Adam/AdamW 0.001."""
    return 0.01 if optimizer == "sgd" else 0.001
