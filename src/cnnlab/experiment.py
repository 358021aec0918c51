"""One experiment, start to finish: config -> data -> model -> fit -> test -> run folder.

This is the only place that sees the whole Config; it hands each part its own table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.augment import Augmenter, Normalizer
from cnnlab.callbacks import EarlyStopping
from cnnlab.config import Config, DataConfig, to_dict
from cnnlab.data import Dataset, load_dataset, split_train_val
from cnnlab.engine import Batches, Trainer, fit, resolve_device
from cnnlab.errors import ConfigError
from cnnlab.models import count_params, summary
from cnnlab.models.build import build_model
from cnnlab.plots import plot_curves
from cnnlab.runs import RunFolder, environment, load_checkpoint, save_checkpoint


@dataclass
class Splits:
    train: Batches
    val: Batches
    test: Batches
    normalizer: Normalizer


def prepare_splits(ds: Dataset, cfg: DataConfig, normalize: str, seed: int, device: torch.device,
                   backbone_norm: Normalizer | None = None) -> Splits:
    """Hold out validation, fit the normalizer on the training split only, move everything to the device."""
    tr, va = split_train_val(ds.y_train, cfg.val_fraction, cfg.val_split, seed)
    x_tr = ds.x_train[tr]
    if normalize == "featurewise":
        norm = Normalizer.fit(x_tr)
    elif normalize == "backbone":
        norm = backbone_norm or Normalizer()
    else:
        norm = Normalizer()

    def dev(x, y):
        return Batches(x.to(device), y.to(device))

    return Splits(dev(x_tr, ds.y_train[tr]), dev(ds.x_train[va], ds.y_train[va]),
                  dev(ds.x_test, ds.y_test), norm)


class DataCache:
    """Data sets loaded once per process and shared by suite rows with the same [data] table."""

    def __init__(self):
        self._cache: dict[str, Dataset] = {}

    def get(self, cfg: DataConfig, quiet: bool) -> Dataset:
        key = repr(sorted(vars(cfg).items()))
        if key not in self._cache:
            self._cache = {key: load_dataset(cfg, quiet=quiet)}   # keep one: data sets can be large
        return self._cache[key]


def check_sizes(cfg: Config, splits: Splits, source: str) -> None:
    if cfg.train.batch_size > len(splits.train):
        raise ConfigError(f"{source}: [train] 'batch_size' = {cfg.train.batch_size} is larger than the training "
                          f"split ({len(splits.train)} images); lower it")


def run_experiment(cfg: Config, runs_dir: str | Path, *, source: str = "<config>", progress: str = "bar",
                   data_cache: DataCache | None = None, argv: list[str] | None = None,
                   resume: RunFolder | None = None, folder_prefix: str = "") -> RunFolder:
    """Run one config; returns its run folder (results.json has status ok or diverged)."""
    device = resolve_device(cfg.device)
    quiet = progress != "bar"
    ds = (data_cache or DataCache()).get(cfg.data, quiet)
    torch.manual_seed(cfg.seed)           # the seed fixes the initial weights: variants start identical
    model, backbone_norm, image_size = build_model(cfg.model, ds.num_classes, ds.x_train.shape[-1], cfg.train)
    splits = prepare_splits(ds, cfg.data, cfg.train.normalize, cfg.seed, device, backbone_norm)
    check_sizes(cfg, splits, source)

    run = resume or RunFolder.create(runs_dir, folder_prefix + cfg.name)
    table = summary(model, (3, image_size, image_size)) if image_size else str(model)
    if not resume:
        run.write_config(to_dict(cfg))
        run.write_text("summary.txt", table + "\n")
        from cnnlab.runs import write_json
        write_json(run.path / "meta.json", {**environment(device, argv), "data": ds.describe(),
                                            "params": count_params(model), "normalizer": splits.normalizer.state_dict()})
    if progress == "bar":
        print(f"\n== {cfg.name}: {ds.describe()}; {len(splits.train)} train / {len(splits.val)} val  -> {run.path}")
        print(table)

    es = EarlyStopping.from_config(cfg.early_stopping) if cfg.early_stopping.enabled else None
    trainer = Trainer(model, cfg.train, device, cfg.seed, splits.normalizer, Augmenter(cfg.augment, image_size),
                      image_size=image_size if ds.x_train.shape[-1] != image_size else None,
                      eval_crop=cfg.augment.eval_crop, early_stopping=es)
    if resume:
        trainer.load_state_dict(load_checkpoint(run.checkpoints / "last.pt", map_location=device))

    def on_epoch_end(tr: Trainer, logs: dict, is_best: bool) -> None:
        run.write_history(tr.history)
        if is_best:
            save_checkpoint(run.checkpoints / "best.pt", {"model": tr.model.state_dict(), "epoch": tr.epoch})
        if tr.epoch % cfg.train.checkpoint_every == 0 or tr.epoch == cfg.train.epochs:
            save_checkpoint(run.checkpoints / "last.pt", tr.state_dict())

    t0 = time.perf_counter()
    result = fit(trainer, splits.train, splits.val, cfg.train.epochs, on_epoch_end, progress, label=cfg.name)
    train_seconds = time.perf_counter() - t0
    test_loss, test_acc = (float("nan"), float("nan")) if result.diverged else trainer.evaluate(splits.test)
    seconds = sum(h["seconds"] for h in trainer.history)
    results = {"name": cfg.name, "status": "diverged" if result.diverged else "ok",
               "test_loss": test_loss, "test_accuracy": test_acc,
               "epochs_run": trainer.epoch, "epochs_max": cfg.train.epochs, "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "restored_best_weights": result.restored_best,
               "batch_size": cfg.train.batch_size, "optimizer": cfg.train.optimizer, "model": cfg.model.name,
               "seconds": round(seconds, 3), "wall_seconds_this_process": round(train_seconds, 3),
               "train_images_per_second": round(len(splits.train) * trainer.epoch / max(seconds, 1e-9), 1),
               "seed": cfg.seed, "label": cfg.report.label or cfg.name,
               "reference_accuracy": _nan_none(cfg.report.reference_accuracy),
               "reference_loss": _nan_none(cfg.report.reference_loss)}
    if result.diverged:
        results["reason"] = f"loss became {trainer.history[-1]['loss']} at epoch {trainer.epoch}; lower [train] lr"
    run.write_results(results)
    if trainer.history:
        plot_curves(trainer.history, run.path, cfg.report.label or cfg.name)
    if progress != "none":
        if result.diverged:
            print(f"!! {cfg.name}: DIVERGED ({results['reason']})")
        else:
            print(f"== {cfg.name}: test accuracy {test_acc:.4f}  test loss {test_loss:.4f}  "
                  f"({trainer.epoch} epochs, {seconds:.1f}s)  -> {run.path}")
    return run


def _nan_none(v: float) -> float | None:
    return None if v != v else v
