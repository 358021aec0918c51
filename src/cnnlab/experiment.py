"""One experiment, start to finish: config -> data -> model -> fit -> test -> run folder.

This is the only place that sees the whole Config; it hands each part its own table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.augment import Augmenter, Normalizer
from cnnlab.callbacks import EarlyStopping
from cnnlab import distributed
from cnnlab.config import Config, DataConfig, to_dict
from cnnlab.data import Dataset, load_dataset, split_train_val
from cnnlab.engine import Batches, FitResult, Trainer, fit, resolve_device, use_bf16
from cnnlab.errors import CheckpointError, ConfigError, RunInterrupted
from cnnlab.models import count_params, summary
from cnnlab.models.build import build_model
from cnnlab.plots import plot_curves
from cnnlab.trackers import make_trackers
from cnnlab.runs import RunFolder, environment, load_checkpoint, save_checkpoint, write_json


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
    if normalize == "featurewise" and x_tr.dtype == torch.uint8:
        norm = Normalizer.fit(x_tr)
    elif normalize == "backbone" or backbone_norm is not None:
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
        # The validation split is made after loading: rows that differ only there share the loaded data.
        key = repr(sorted((k, v) for k, v in vars(cfg).items() if k not in ("val_fraction", "val_split")))
        if key not in self._cache:
            self._cache = {key: load_dataset(cfg, quiet=quiet)}   # keep one: data sets can be large
        return self._cache[key]


def frozen_features(cfg: Config, model: nn.Module, norm: Normalizer, size: int, ds: Dataset,
                    device: torch.device, quiet: bool) -> tuple[Dataset, dict]:
    """Replace images by the frozen backbone's cached features; returns the feature data set and cache info."""
    from cnnlab.features import cached_features, weights_fingerprint
    ident = {"backbone": cfg.model.name, "weights": weights_fingerprint(model.backbone)}
    bf16 = use_bf16(cfg.train.precision, device)
    args = (norm, size, cfg.augment.eval_crop, device, bf16)
    f_tr, hit_tr = cached_features(model.backbone, ident, ds.x_train, ds.y_train, *args, split="train", quiet=quiet)
    f_te, hit_te = cached_features(model.backbone, ident, ds.x_test, ds.y_test, *args, split="test", quiet=quiet)
    return Dataset(f_tr, ds.y_train, f_te, ds.y_test, ds.classes, ds.name), {"features_from_cache": hit_tr and hit_te}


def run_experiment(cfg: Config, runs_dir: str | Path, *, source: str = "<config>", progress: str = "bar",
                   data_cache: DataCache | None = None, argv: list[str] | None = None,
                   resume: RunFolder | None = None, folder: RunFolder | None = None,
                   folder_prefix: str = "") -> RunFolder:
    """Run one config; returns its run folder (results.json has status ok or diverged).

    resume: continue the run in that folder from its last checkpoint. folder: write a fresh run into this
    (existing, empty) folder instead of a new one under runs_dir. Under torchrun every rank runs this;
    only rank 0 creates and writes the run folder.
    """
    main = distributed.init_from_env().is_main
    progress = progress if main else "none"
    device = resolve_device(cfg.device)
    quiet = progress != "bar"
    ds = (data_cache or DataCache()).get(cfg.data, quiet)
    torch.manual_seed(cfg.seed)           # the seed fixes the initial weights: variants start identical
    model, backbone_norm, size = build_model(cfg.model, ds.num_classes, ds.x_train.shape[-1], cfg.train)
    table = summary(model, (3, size, size))
    extra = {}
    trained = model
    if cfg.train.freeze_backbone:
        if not hasattr(model, "backbone"):
            raise ConfigError(f"{source}: [train] freeze_backbone = true needs a backbone model, not {cfg.model.name!r}")
        ds, extra = frozen_features(cfg, model, backbone_norm, size, ds, device, quiet)
        trained, backbone_norm = model.head, None
    splits = prepare_splits(ds, cfg.data, cfg.train.normalize, cfg.seed, device, backbone_norm)
    if cfg.train.batch_size > len(splits.train):
        raise ConfigError(f"{source}: [train] 'batch_size' = {cfg.train.batch_size} is larger than the training "
                          f"split ({len(splits.train)} images); lower it")

    run = resume or folder or (RunFolder.create(runs_dir, folder_prefix + cfg.name) if main else None)
    if main and not resume:
        run.write_config(to_dict(cfg))
        run.write_text("summary.txt", table + "\n")
        write_json(run.path / "meta.json", {**environment(device, argv), "data": ds.describe(), "source": source,
                                            "world_size": distributed.info().world, "params": count_params(model),
                                            "normalizer": splits.normalizer.state_dict()})
    if progress == "bar":
        print(f"\n== {cfg.name}: {ds.describe()}; {len(splits.train)} train / {len(splits.val)} val -> {run.path}")
        print(table)

    identity = checkpoint_identity(cfg, ds.num_classes)
    view = size if ds.x_train.ndim == 4 and ds.x_train.shape[-1] != size else None

    def make_trainer(net: nn.Module, epochs_cfg) -> Trainer:
        es = EarlyStopping.from_config(cfg.early_stopping) if cfg.early_stopping.enabled else None
        return Trainer(net, epochs_cfg, device, cfg.seed, splits.normalizer, Augmenter(cfg.augment, size),
                       image_size=view, eval_crop=cfg.augment.eval_crop, early_stopping=es)

    trackers = make_trackers(cfg.tracking.loggers, run.path, to_dict(cfg), cfg.tracking.mlflow_uri) if main else []

    def on_epoch_end(tr: Trainer, logs: dict, is_best: bool) -> None:
        if not main:
            return
        run.write_history(tr.history)
        for t in trackers:
            t.log_epoch(logs)
        if is_best:
            save_checkpoint(run.checkpoints / "best.pt", {"model": tr.model.state_dict(), "epoch": tr.epoch})
        if tr.epoch % cfg.train.checkpoint_every == 0 or tr.epoch == cfg.train.epochs:
            save_checkpoint(run.checkpoints / "last.pt", {**tr.state_dict(), "identity": identity})

    try:
        trainer, result = _train(cfg, trained, make_trainer, splits, on_epoch_end, progress, resume, run, device,
                                 identity)
    except KeyboardInterrupt:
        raise RunInterrupted(run.path if run else "") from None
    test_loss, test_acc = (float("nan"), float("nan")) if result.diverged else trainer.evaluate(splits.test)
    if main:
        results = _finish(cfg, run, trainer, result, splits, test_loss, test_acc, extra, progress)
        for t in trackers:
            t.log_results(results, run.path)
            t.close()
    return run


def _train(cfg, net, make_trainer, splits, on_epoch_end, progress, resume, run, device,
           identity) -> tuple[Trainer, FitResult]:
    """Plain training, or for fine-tuning: the head alone first (backbone frozen), then everything."""
    head_epochs = cfg.train.head_epochs if hasattr(net, "set_backbone_trainable") else 0
    history: list[dict] = []
    state = None
    if resume:
        path = run.checkpoints / "last.pt"
        state = load_checkpoint(path, map_location=device)
        check_identity(path, state.get("identity"), identity)
    if state is not None and state.get("phase") == "head":
        state = None          # killed while training the head alone: that short phase starts over
    if head_epochs and state is None:
        net.set_backbone_trainable(False)
        head_cfg = dataclasses.replace(cfg.train, epochs=head_epochs, backbone_lr_mult=1.0)
        t = make_trainer(net, head_cfg)
        t.early_stopping, t.phase = None, "head"
        fit(t, splits.train, splits.val, head_epochs, on_epoch_end, progress, label=f"{cfg.name} [head]")
        net.set_backbone_trainable(True)
        history = t.history
    trainer = make_trainer(net, cfg.train)
    trainer.history, trainer.epoch = list(history), len(history)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{run.checkpoints / 'last.pt'}: does not fit model {cfg.model.name!r} of config "
                                  f"{cfg.name!r} ({str(e).splitlines()[0][:200]})") from None
    result = fit(trainer, splits.train, splits.val, cfg.train.epochs, on_epoch_end, progress, label=cfg.name)
    return trainer, result


def checkpoint_identity(cfg: Config, num_classes: int) -> dict:
    """What a checkpoint belongs to; compared on resume so a swapped file gives a clear error."""
    return {"config": cfg.name, "model": cfg.model.name, "num_classes": num_classes,
            "freeze_backbone": cfg.train.freeze_backbone}


def check_identity(path: Path, found: dict | None, expected: dict) -> None:
    if found is not None and found != expected:
        raise CheckpointError(f"{path}: this checkpoint is from config {found.get('config')!r} (model "
                              f"{found.get('model')!r}, {found.get('num_classes')} classes), but the run is config "
                              f"{expected['config']!r} (model {expected['model']!r}, {expected['num_classes']} classes)")


def _finish(cfg: Config, run: RunFolder, trainer: Trainer, result: FitResult, splits: Splits,
            test_loss: float, test_acc: float, extra: dict, progress: str) -> dict:
    seconds = sum(h["seconds"] for h in trainer.history)
    results = {"name": cfg.name, "status": "diverged" if result.diverged else "ok",
               "test_loss": _nan_none(test_loss), "test_accuracy": _nan_none(test_acc),
               "epochs_run": trainer.epoch, "epochs_max": cfg.train.epochs, "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "restored_best_weights": result.restored_best,
               "batch_size": cfg.train.batch_size, "optimizer": cfg.train.optimizer, "model": cfg.model.name,
               "seconds": round(seconds, 3),
               "train_images_per_second": round(len(splits.train) * trainer.epoch / max(seconds, 1e-9), 1),
               "seed": cfg.seed, "label": cfg.report.label or cfg.name,
               "reference_accuracy": _nan_none(cfg.report.reference_accuracy),
               "reference_loss": _nan_none(cfg.report.reference_loss), **extra}
    if result.diverged:
        results["reason"] = f"loss became {trainer.history[-1]['loss']} at epoch {trainer.epoch}; lower [train] lr"
    run.write_results(results)
    if trainer.history:
        plot_curves(trainer.history, run.path, cfg.report.label or cfg.name)
    if progress != "none":
        _say_result(cfg, results, trainer.epoch, seconds, run)
    return results


def _say_result(cfg: Config, results: dict, epochs: int, seconds: float, run: RunFolder) -> None:
    if results["status"] == "diverged":
        print(f"!! {cfg.name}: DIVERGED ({results['reason']})")
    else:
        print(f"== {cfg.name}: test accuracy {results['test_accuracy']:.4f}  test loss {results['test_loss']:.4f}  "
              f"({epochs} epochs, {seconds:.1f}s)  -> {run.path}")


def _nan_none(v: float) -> float | None:
    return None if v != v else v

