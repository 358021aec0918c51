"""A run, step one: `prepare(cfg) -> Plan`. It reads the data, builds the model, holds out validation, fixes the
one input pipeline and places the splits on the device. Nothing trains and nothing is written.

    plan = prepare(cfg)          # data, model, Preprocess, splits; the frozen-feature recipe applied
    outcome = train(plan, recorder)                                # experiments/run.py

The frozen-feature recipe (experiments/frozen.py) is one Plan -> Plan transform applied here: it replaces the
images by the backbone's cached features and the trained module by the head.
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.config import Config, DataConfig
from cnnlab.data import Dataset, train_val_split
from cnnlab.data.preprocess import Normalizer, Preprocess
from cnnlab.data.stream import rows_of
from cnnlab.errors import ConfigError
from cnnlab.experiments import frozen
from cnnlab.experiments.holdout import holdout
from cnnlab.experiments.plan import DataCache, Plan, Splits, choose_normalizer, place_splits, split_warnings
from cnnlab.models import summary
from cnnlab.models.build import build_model
from cnnlab.runtime import allocator, threads
from cnnlab.runtime.device import resolve_device


def prepare(cfg: Config, *, source: str = "<config>", progress: str = "bar", data_cache: DataCache | None = None,
            resume: bool = False) -> Plan:
    """The plan of a run (or of the resumed run: `resume` skips what the first attempt already did once)."""
    quiet = progress != "bar"
    # before any kernel runs: cuBLAS reads its workspace setting once, at its first call (airnet's whitening)
    threads.deterministic_algorithms(cfg.train.deterministic)
    device = resolve_device(cfg.device)
    ds = (data_cache or DataCache()).get(cfg.data, quiet)
    torch.manual_seed(cfg.seed)           # the seed fixes the initial weights: variants start identical
    try:
        model, backbone_norm, size = build_model(cfg.model, ds.num_classes, ds.x_train.shape[-1])
    except ConfigError as e:              # what only the data decides (classes, image size): name the file too
        if not str(e).startswith("[model]"):
            raise
        raise ConfigError(f"{source}: {e}") from None
    if size >= allocator.LARGE_INPUT:     # activations of tens of MB: no page faults per batch
        allocator.keep_freed_memory()
    if cfg.augment.test_shift >= size:
        raise ConfigError(f"{source}: [augment] test_shift = {cfg.augment.test_shift} is not smaller than the "
                          f"{size}px images; use 1 or 2 pixels")
    table = summary(model, (3, size, size))
    if cfg.folds:               # one fold of a K-fold cross-validation over the training split
        tr_idx, va_idx, fold_notes = holdout(ds.y_train, cfg.data, cfg.seed, cfg.folds, cfg.fold, list(ds.classes))
    else:                       # an image folder's val/, or val_fraction (a Keras 'last' becomes stratified there)
        tr_idx, va_idx, fold_notes = train_val_split(ds, cfg.data, cfg.seed)
    norm = choose_normalizer(cfg.train.normalize, rows_of(ds.x_train, ds.files.get("x_train"), tr_idx),
                             backbone_norm, source)
    preprocess = Preprocess.from_normalizer(norm, ds.x_train.shape[-1], size, cfg.augment.eval_crop)
    plan = Plan(cfg, source, device, ds, model, model, preprocess, size, tr_idx, va_idx, table, ds.x_test,
                notes=cfg.notes() + ds.notes + fold_notes + split_warnings(ds, tr_idx, va_idx, cfg.data))
    plan = frozen.apply(plan, progress, resume)
    if plan.frozen:          # only the head trains (on cached features): the table counts it alone as trainable
        plan.table = summary(model, (3, size, size), trained=plan.trained)
    if plan.splits is None:
        plan.splits = place_splits(plan, quiet=progress == "none")
    if cfg.train.batch_size > len(plan.splits.train):
        raise ConfigError(f"{source}: [train] 'batch_size' = {cfg.train.batch_size} is larger than the training "
                          f"split ({len(plan.splits.train)} images); lower it")
    return plan


def prepare_splits(ds: Dataset, cfg: DataConfig, normalize: str, seed: int, device: torch.device,
                   backbone_norm: Normalizer | None = None) -> tuple[Splits, Preprocess]:
    """The image path of `prepare` alone, for benchmarks and notebooks: hold out validation, fit the
    normalizer on the training split only, place the splits on the device; (splits, their Preprocess)."""
    tr, va, _ = train_val_split(ds, cfg, seed)
    norm = choose_normalizer(normalize, rows_of(ds.x_train, ds.files.get("x_train"), tr), backbone_norm, "<config>")
    size = ds.x_train.shape[-1]
    plan = Plan(Config(data=cfg), "<config>", device, ds, nn.Identity(), nn.Identity(),
                Preprocess.from_normalizer(norm, size, size, 1.0), size, tr, va, "", ds.x_test)
    return place_splits(plan), plan.preprocess
