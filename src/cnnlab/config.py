"""Experiment configs: TOML files -> typed, validated dataclasses.

A config has a few top-level keys (name, seed, ...) and one table per part of the pipeline. Each part
of the code receives only its own table (`cfg.data`, `cfg.train`, ...). Every value is checked here,
once, so the rest of the code can trust it: an unknown key, a wrong type or an out-of-range value
raises ConfigError naming the key and the file.
"""
from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.errors import ConfigError


@dataclass
class DataConfig:
    source: str = "cifar100"          # cifar100 | cifar10 | imagefolder | synthetic | cub200-2010 | cub200-2011
    data_dir: str = ""                # "" -> $CNNLAB_DATA or ~/.cache/cnnlab/data
    classes: int | list = 25          # first N classes, or a list of class indices / names; 0 = all
    max_train_per_class: int = 0      # first N train images of each class, in record order (0 = all)
    max_test_per_class: int = 0
    val_fraction: float = 0.1         # held out from train for validation
    val_split: str = "stratified"     # stratified | random | last (Keras fit) | first (Keras ImageDataGenerator)
    image_size: int = 0               # resize (shorter side + center crop) for JPEG sources; 0 = source default
    download: bool = True             # download official archives when missing (needs internet)
    skip_corrupt: bool = False        # skip unreadable images with a warning instead of failing
    synthetic_train: int = 2000       # synthetic source only: images per split
    synthetic_test: int = 500


@dataclass
class ModelConfig:
    name: str = "basenet"             # a registered model (`cnnlab models`), a timm/torchvision name, or pkg.mod:fn
    weights: str = ""                 # backbones: "" (default pretrained tag), a tag, a local file, or "none"
    head: list = field(default_factory=list)    # hidden sizes of the dense head on a backbone, e.g. [400]
    input_size: int = 0               # backbones: image size the network sees (0 = the weights' default, e.g. 224)
    args: dict = field(default_factory=dict)    # extra keyword arguments for the model function


@dataclass
class TrainConfig:
    optimizer: str = "sgd"            # sgd | adam | adamw
    lr: float | None = None           # omitted -> the optimizer's Keras default (sgd 0.01, adam 0.001)
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    eps: float = 1e-7                 # Adam epsilon (Keras default)
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 500
    label_smoothing: float = 0.0
    schedule: str = "constant"        # constant | cosine | onecycle
    warmup_epochs: float = 0.0
    normalize: str = "none"           # none | featurewise (per-channel mean/std of the train split) | backbone
    precision: str = "auto"           # auto (bf16 autocast on GPUs with bf16 and CPUs with AMX, else fp32) | fp32 | bf16
    channels_last: bool = True
    freeze_backbone: bool = False     # train only the head (features computed once and cached)
    head_epochs: int = 0              # fine-tuning: first train the head alone for this many epochs
    backbone_lr_mult: float = 1.0     # fine-tuning: backbone lr = lr * this
    checkpoint_every: int = 1         # epochs between 'last' checkpoints


@dataclass
class AugmentConfig:
    zoom: float = 0.0                 # Keras zoom_range: x and y zoom drawn independently in [1-z, 1+z]
    hflip: bool = False               # random horizontal flip, p = 0.5
    crop_padding: int = 0             # random crop after reflect padding (0 = off)
    random_resized_crop: bool = False  # Inception-style crop (scale 0.08..1 by default) for large images
    rrc_min_scale: float = 0.08
    eval_crop: float = 0.875          # large images: center crop fraction at evaluation / feature extraction


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val_loss"
    mode: str = "auto"                # auto | min | max
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False
    start_from_epoch: int = 0
    baseline: float = float("nan")    # nan = none


@dataclass
class ReportConfig:
    label: str = ""                   # row label in the report
    reference_accuracy: float = float("nan")  # the practice's own reported test accuracy for this row
    reference_loss: float = float("nan")


@dataclass
class TrackingConfig:
    loggers: list = field(default_factory=list)   # extra trackers besides the run folder: tensorboard, mlflow
    mlflow_uri: str = ""              # "" -> $MLFLOW_TRACKING_URI, else a local store in <runs dir>/mlruns


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    seeds: int = 1                    # run with seeds seed, seed+1, ... (the report gives mean ± std and tests)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Field types are strings under postponed annotations; resolve them once.
_HINTS = typing.get_type_hints(Config)
SECTIONS = {name: tp for name, tp in _HINTS.items() if dataclasses.is_dataclass(tp)}


# ---------------------------------------------------------------- type checking

def _type_ok(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return {int: "integer", float: "number", bool: "true/false", str: "string", list: "list", dict: "table"}.get(tp, str(tp))


def _set_field(obj: Any, key: str, value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{where}: unknown key '{key}' (known keys: {known})")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: '{key}' is a table; write [{key}] or {key}.<key> = value")
    if not _type_ok(value, tp):
        raise ConfigError(f"{where}: '{key}' must be a {_type_name(tp)}, got {value!r}")
    if tp is float or (isinstance(value, int) and not isinstance(value, bool) and _type_ok(1.5, tp)):
        value = float(value)
    setattr(obj, key, value)


def apply_dict(cfg: Config, raw: dict, source: str) -> Config:
    """Apply a parsed TOML document onto cfg (in place) with full type checking."""
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a table ([{key}])")
            section = getattr(cfg, key)
            for sub, v in value.items():
                _set_field(section, sub, v, f"{source}: [{key}]")
        else:
            _set_field(cfg, key, value, source)
    return cfg


def _parse_value(text: str) -> Any:
    """A command-line value: parsed as TOML when it is valid TOML, else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`--set section.key=value` overrides, e.g. train.epochs=5 or data.classes=[0,1,2]."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text.strip())
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"--set {key}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
            _set_field(getattr(cfg, section), sub, value, f"--set [{section}]")
        else:
            _set_field(cfg, key, value, "--set")
    return cfg


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path, overrides: list[str] = (), data_preset: tuple[dict, str] | None = None) -> Config:
    """Read a config file, then an optional data preset (its [data] keys win), then --set overrides."""
    cfg = Config()
    raw = read_toml(path)
    apply_dict(cfg, raw, str(path))
    if data_preset is not None:
        preset, preset_source = data_preset
        apply_dict(cfg, {"data": preset.get("data", {})}, preset_source)
    apply_overrides(cfg, list(overrides))
    validate(cfg, str(path))
    if cfg.name == "experiment" and "name" not in raw:
        cfg.name = Path(path).stem
    return cfg


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = apply_dict(Config(), copy.deepcopy(raw), source)
    validate(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain dict for TOML/JSON; NaN floats (meaning 'unset') are dropped since TOML writers differ on them."""
    def clean(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = clean(v)
            elif not (isinstance(v, float) and v != v):
                out[k] = v
        return out
    return clean(dataclasses.asdict(cfg))


# ---------------------------------------------------------------- range checks

def _check(cond: bool, where: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: '{key}' {msg}")


def _choice(value: str, choices: tuple, where: str, key: str) -> None:
    _check(value in choices, where, key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate(cfg: Config, where: str) -> None:
    d, t, a, es = cfg.data, cfg.train, cfg.augment, cfg.early_stopping
    _check(cfg.seed >= 0, where, "seed", "must be >= 0")
    _check(cfg.seeds >= 1, where, "seeds", "must be >= 1")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), where, "device",
           f"must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    w = f"{where}: [data]"
    _check(0.0 <= d.val_fraction < 1.0, w, "val_fraction", f"must be in [0, 1); got {d.val_fraction}")
    _choice(d.val_split, ("stratified", "random", "last", "first"), w, "val_split")
    _check(d.max_train_per_class >= 0, w, "max_train_per_class", "must be >= 0")
    _check(d.max_test_per_class >= 0, w, "max_test_per_class", "must be >= 0")
    _check(d.image_size >= 0, w, "image_size", "must be >= 0")
    _check(cfg.model.input_size >= 0, f"{where}: [model]", "input_size", "must be >= 0")
    _check(all(isinstance(h, int) and h > 0 for h in cfg.model.head), f"{where}: [model]", "head",
           "must list positive layer sizes, e.g. [400]")
    if isinstance(d.classes, int):
        _check(d.classes >= 0, w, "classes", "must be >= 0 (0 = all classes) or a list")
    else:
        _check(len(d.classes) > 0, w, "classes", "must not be an empty list")
        _check(all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in d.classes), w, "classes",
               "must list class indices or class names")
    _check(d.synthetic_train > 0, w, "synthetic_train", "must be > 0")
    _check(d.synthetic_test > 0, w, "synthetic_test", "must be > 0")
    w = f"{where}: [train]"
    _choice(t.optimizer, ("sgd", "adam", "adamw"), w, "optimizer")
    if t.lr is None:  # resolved here so the saved config states the value actually used
        t.lr = default_lr(t.optimizer)
    _check(t.lr > 0, w, "lr", f"must be > 0 (omit it for the optimizer's Keras default); got {t.lr}")
    _check(t.epochs >= 1, w, "epochs", f"must be >= 1; got {t.epochs}")
    _check(t.batch_size >= 1, w, "batch_size", f"must be >= 1; got {t.batch_size}")
    _check(t.eval_batch_size >= 1, w, "eval_batch_size", "must be >= 1")
    _check(0.0 <= t.momentum < 1.0, w, "momentum", f"must be in [0, 1); got {t.momentum}")
    _check(t.weight_decay >= 0, w, "weight_decay", "must be >= 0")
    _check(t.eps > 0, w, "eps", "must be > 0")
    _check(0.0 <= t.label_smoothing < 1.0, w, "label_smoothing", "must be in [0, 1)")
    _choice(t.schedule, ("constant", "cosine", "onecycle"), w, "schedule")
    _check(0 <= t.warmup_epochs < t.epochs or t.warmup_epochs == 0, w, "warmup_epochs", "must be in [0, epochs)")
    _choice(t.normalize, ("none", "featurewise", "backbone"), w, "normalize")
    _choice(t.precision, ("fp32", "bf16", "auto"), w, "precision")
    _check(t.head_epochs >= 0, w, "head_epochs", "must be >= 0")
    _check(t.backbone_lr_mult >= 0, w, "backbone_lr_mult", "must be >= 0")
    _check(t.checkpoint_every >= 1, w, "checkpoint_every", "must be >= 1")
    w = f"{where}: [augment]"
    _check(0.0 <= a.zoom < 1.0, w, "zoom", f"must be in [0, 1); got {a.zoom}")
    _check(a.crop_padding >= 0, w, "crop_padding", "must be >= 0")
    _check(0.0 < a.rrc_min_scale <= 1.0, w, "rrc_min_scale", "must be in (0, 1]")
    _check(0.0 < a.eval_crop <= 1.0, w, "eval_crop", "must be in (0, 1]")
    for name in cfg.tracking.loggers:
        _check(name in ("tensorboard", "mlflow"), f"{where}: [tracking]", "loggers",
               f"lists {name!r}; choose among tensorboard, mlflow")
    w = f"{where}: [early_stopping]"
    _choice(es.mode, ("auto", "min", "max"), w, "mode")
    _check(es.patience >= 0, w, "patience", "must be >= 0")
    _check(es.min_delta >= 0, w, "min_delta", "must be >= 0 (Keras uses its absolute value)")
    _check(es.start_from_epoch >= 0, w, "start_from_epoch", "must be >= 0")
    _check(es.monitor in MONITORS or not es.enabled, w, "monitor",
           f"must be one of {', '.join(MONITORS)}; got {es.monitor!r}")
    if es.enabled and es.monitor.startswith("val_"):
        _check(d.val_fraction > 0, w, "monitor", f"is {es.monitor!r} but [data] val_fraction = 0 gives no validation split")


MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy")


def default_lr(optimizer: str) -> float:
    """Keras's defaults: SGD 0.01, Adam/AdamW 0.001."""
    return 0.01 if optimizer == "sgd" else 0.001
