"""One experiment, start to finish: config -> data -> model -> fit -> test evaluation -> run folder.

This is the only place that sees the whole Config; it hands each part its own table. `run_experiment`
reads top to bottom as the pipeline it is; each step is a function of a screen below it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab.runtime import allocator, distributed
from cnnlab.data.augment import Augmenter
from cnnlab.training.callbacks import (Callback, EarlyStopping, HistoryWriter, ModelCheckpoint, PrintLogger, ProgressBar,
                              TrackerLogger, make_monitor)
from cnnlab.config import Config, DataConfig, to_dict
from cnnlab.data import Dataset, load_dataset, split_train_val
from cnnlab.data.stream import RowFile, memory_budget, place, rows_of
from cnnlab.runtime.device import resolve_device, use_bf16
from cnnlab.training.engine import FitResult, Split, Trainer, fit
from cnnlab.errors import CheckpointError, ConfigError, RunInterrupted
from cnnlab.models import count_params, init_from_data, layers_set_from_data, summary
from cnnlab.models.build import build_model
from cnnlab.records.plots import plot_curves
from cnnlab.data.preprocess import Normalizer, Preprocess
from cnnlab.records.runs import Results, RunFolder, RunRecorder
from cnnlab.records.io import load_checkpoint
from cnnlab.records.meta import environment
from cnnlab.transfer.probe import probe_head
from cnnlab.transfer.search import prepare_frozen_head


@dataclass
class Splits:
    train: Split                    # on the device, or streamed when over [data] memory_budget_mb
    val: Split
    test: Split
    normalizer: Normalizer          # applied to the batches above (identity for cached features)


@dataclass
class RunOutcome:
    """What run_experiment hands back, on every rank: the run folder (None on ranks > 0) and its results."""
    path: Path | None
    results: Results
    history: list[dict]


class DataCache:
    """Data sets loaded once per process and shared by suite rows with the same [data] table."""

    def __init__(self):
        self._cache: dict[str, Dataset] = {}

    def get(self, cfg: DataConfig, quiet: bool) -> Dataset:
        # The validation split and the device placement come after loading: rows that differ only there
        # share the loaded data.
        later = ("val_fraction", "val_split", "memory_budget_mb")
        key = repr(sorted((k, v) for k, v in vars(cfg).items() if k not in later))
        if key not in self._cache:
            self._cache = {key: load_dataset(cfg, quiet=quiet)}   # keep one: data sets can be large
        return self._cache[key]


def run_experiment(cfg: Config, runs_dir: str | Path, *, source: str = "<config>", progress: str = "bar",
                   data_cache: DataCache | None = None, argv: list[str] | None = None,
                   resume: RunFolder | None = None, folder: RunFolder | None = None,
                   callbacks: list[Callback] = ()) -> RunOutcome:
    """Run one config (or resume the run in `resume`); `folder`: an existing empty folder to write into.
    Under torchrun every rank runs this; only rank 0 writes (its RunRecorder is the only real one)."""
    main = distributed.init_from_env().is_main
    progress = progress if main else "none"
    device = resolve_device(cfg.device)
    ds = (data_cache or DataCache()).get(cfg.data, progress != "bar")
    torch.manual_seed(cfg.seed)           # the seed fixes the initial weights: variants start identical
    model, backbone_norm, size = build_model(cfg.model, ds.num_classes, ds.x_train.shape[-1])
    if size >= allocator.LARGE_INPUT:     # activations of tens of MB: no page faults per batch
        allocator.keep_freed_memory()
    if cfg.augment.test_shift >= size:
        raise ConfigError(f"{source}: [augment] test_shift = {cfg.augment.test_shift} is not smaller than the "
                          f"{size}px images; use 1 or 2 pixels")
    table = summary(model, (3, size, size))
    tr_idx, va_idx = split_train_val(ds.y_train, cfg.data.val_fraction, cfg.data.val_split, cfg.seed)
    image_norm = choose_normalizer(cfg.train.normalize, rows_of(ds.x_train, ds.files.get("x_train"), tr_idx),
                                   backbone_norm, source)
    preprocess = Preprocess.from_normalizer(image_norm, ds.x_train.shape[-1], size, cfg.augment.eval_crop)
    test_images, trained, extra = ds.x_test, model, {}
    if cfg.train.freeze_backbone:
        ds, extra = frozen_features(model, cfg.model.name, preprocess, ds, device,
                                    extraction_bf16(cfg.train.precision, device, model, preprocess.input_size),
                                    progress != "bar", source)
        trained, image_norm = model.head, Normalizer()
    splits = to_device(ds, tr_idx, va_idx, image_norm, device, cfg.data, quiet=progress == "none")
    if cfg.train.batch_size > len(splits.train):
        raise ConfigError(f"{source}: [train] 'batch_size' = {cfg.train.batch_size} is larger than the training "
                          f"split ({len(splits.train)} images); lower it")
    notes = split_warnings(ds, tr_idx, va_idx, cfg.data)
    if cfg.train.probe_epochs and not resume:     # the head from a linear probe on frozen features (probe.py)
        extra = linear_probe(model, cfg, preprocess, ds, tr_idx, va_idx, device, progress != "bar", source)
    if cfg.train.freeze_backbone:      # feature standardization and the [search] grid, on the cached features
        cfg, extra = prepare_frozen_head(cfg, trained, splits.train, splits.val, device, progress == "none", extra)

    recorder = RunRecorder((resume or folder or RunFolder.create(runs_dir, cfg.name)) if main else None)
    try:
        if not resume:
            record_start(recorder, cfg, model, ds, preprocess, table, device, argv, source, trained is not model)
        recorder.start_trackers(cfg.tracking.loggers, to_dict(cfg), cfg.tracking.mlflow_uri)
        for note in notes:
            print(f"warning: {cfg.name}: {note}")
        if progress == "bar":
            print(f"\n== {cfg.name}: {ds.describe()}; {len(splits.train)} train / {len(splits.val)} val -> {recorder.path}")
            print(table)
        if not resume:
            init_layers_from_data(trained, splits.train, splits.normalizer)
        trainer = Trainer(trained, cfg.train, device, cfg.seed, splits.normalizer, Augmenter(cfg.augment, size),
                          image_size=size if ds.x_train.ndim == 4 else None, eval_crop=cfg.augment.eval_crop,
                          test_flip=cfg.augment.test_flip, test_shift=cfg.augment.test_shift)
        identity = checkpoint_identity(cfg, ds.num_classes)
        if resume:
            restore(trainer, resume, identity, device, cfg)
        checkpoint, stopper, standard = standard_callbacks(cfg, recorder, progress, len(splits.val) > 0, identity)
        try:
            fitted = fit(trainer, splits.train, splits.val, standard + list(callbacks))
        except KeyboardInterrupt:
            raise RunInterrupted(recorder.path or "") from None
        results = finish(trainer, fitted, splits, test_images, ds.classes, checkpoint, stopper, recorder, cfg, notes,
                         extra)
        if progress != "none":
            say_result(results, recorder.path)
    finally:
        recorder.close()
    return RunOutcome(recorder.path, results, trainer.history)


# ---------------------------------------------------------------- steps of the pipeline

def choose_normalizer(mode: str, x_train: torch.Tensor, backbone_norm: Normalizer | None, source: str) -> Normalizer:
    """[train] normalize: featurewise statistics of the training split, the backbone's own, or none."""
    if mode == "featurewise":
        return Normalizer.fit(x_train)
    if mode == "backbone" and backbone_norm is None:
        raise ConfigError(f"{source}: [train] normalize = 'backbone' needs a backbone model (timm, tv: or package.module:fn)")
    if mode in ("backbone", "auto") and backbone_norm is not None:
        return backbone_norm
    return Normalizer()


def prepare_splits(ds: Dataset, cfg: DataConfig, normalize: str, seed: int, device: torch.device,
                   backbone_norm: Normalizer | None = None) -> Splits:
    """Hold out validation, fit the normalizer on the training split only, move everything to the device
    (the image path of run_experiment in one call, for benchmarks and notebooks)."""
    tr, va = split_train_val(ds.y_train, cfg.val_fraction, cfg.val_split, seed)
    norm = choose_normalizer(normalize, rows_of(ds.x_train, ds.files.get("x_train"), tr), backbone_norm, "<config>")
    return to_device(ds, tr, va, norm, device, cfg)


def linear_probe(model: nn.Module, cfg: Config, preprocess: Preprocess, ds: Dataset, tr_idx: torch.Tensor,
                 va_idx: torch.Tensor, device: torch.device, quiet: bool, source: str) -> dict:
    """Train the fine-tuning model's head on the backbone's cached frozen features of the training images."""
    bf16 = extraction_bf16(cfg.train.precision, device, model, preprocess.input_size)
    feats, _ = frozen_features(model, cfg.model.name, preprocess, ds, device, bf16, quiet, source, test=False)
    return probe_head(model.head, feats.x_train, feats.y_train, tr_idx, va_idx, cfg.train, cfg.seed, device, quiet)


def frozen_features(model: nn.Module, name: str, preprocess: Preprocess, ds: Dataset, device: torch.device,
                    bf16: bool, quiet: bool, source: str, test: bool = True) -> tuple[Dataset, dict]:
    """Replace images by the frozen backbone's cached features; returns the feature data set and cache info."""
    if not hasattr(model, "backbone"):
        raise ConfigError(f"{source}: [train] freeze_backbone = true needs a backbone model, not {name!r}")
    from cnnlab.transfer.features import feature_array, release_compiled, weights_fingerprint
    ident = {"backbone": name, "weights": weights_fingerprint(model.backbone)}
    args = (preprocess.normalizer(), preprocess.input_size, preprocess.eval_crop, device, bf16)
    kw = {"quiet": quiet, "flip_average": model.flip_average}
    f_tr, hit_tr = feature_array(model.backbone, ident, ds.x_train, ds.y_train, *args, split="train",
                                 file=ds.files.get("x_train"), **kw)
    files = {"x_train": RowFile.of(f_tr)}          # memory-mapped: streamed when over the budget
    if test:
        f_te, hit_te = feature_array(model.backbone, ident, ds.x_test, ds.y_test, *args, split="test",
                                     file=ds.files.get("x_test"), **kw)
        files["x_test"] = RowFile.of(f_te)
    else:
        f_te, hit_te = np.zeros((0, f_tr.shape[1]), dtype=np.float32), True
    release_compiled()
    return (Dataset(torch.from_numpy(f_tr), ds.y_train, torch.from_numpy(f_te), ds.y_test, ds.classes, ds.name, files),
            {"features_from_cache": hit_tr and hit_te})


def extraction_bf16(precision: str, device: torch.device, model: nn.Module, size: int) -> bool:
    """bf16 autocast for feature extraction: precision 'auto' times the backbone's forward on this machine."""
    return hasattr(model, "backbone") and use_bf16(precision, device, model.backbone, (16, 3, size, size), train=False)


def to_device(ds: Dataset, tr: torch.Tensor, va: torch.Tensor, norm: Normalizer, device: torch.device,
              cfg: DataConfig | None = None, quiet: bool = False) -> Splits:
    """Each split onto the device while [data] memory_budget_mb lasts (train first), the rest streamed."""
    train, test = ds.files.get("x_train"), ds.files.get("x_test")
    placed = place({"train": (rows_of(ds.x_train, train, tr), ds.y_train[tr]),
                    "val": (rows_of(ds.x_train, train, va), ds.y_train[va]),
                    "test": (rows_of(ds.x_test, test), ds.y_test)},
                   device, memory_budget(cfg.memory_budget_mb if cfg else 0, device),
                   None if quiet or not distributed.info().is_main else print)
    return Splits(placed["train"], placed["val"], placed["test"], norm)


def init_layers_from_data(model: nn.Module, train: Split, normalizer: Normalizer, n: int = 5000) -> None:
    """Layers set from the training images before the first step (airnet's patch whitening): from at most `n`
    images spread evenly over the training split (an image folder's records are sorted by class), normalized
    as the network sees them. Deterministic per seed."""
    if not layers_set_from_data(model) or not len(train):          # no images gathered for nothing
        return
    picks = torch.arange(0, len(train), -(-len(train) // n))
    xb, _ = next(iter(train.batches(picks, [slice(0, len(picks))])))
    init_from_data(model, normalizer(xb).to(next(model.parameters()).device))


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


def record_start(recorder: RunRecorder, cfg: Config, model: nn.Module, ds: Dataset, preprocess: Preprocess,
                 table: str, device: torch.device, argv, source: str, frozen: bool) -> None:
    """Everything a later command needs to rebuild the model and its inputs from the folder alone."""
    resolved = to_dict(cfg)
    resolved["train"]["lr"] = cfg.train.effective_lr       # the value used, also when the file omits it
    recorder.write_config(resolved)
    recorder.write_text("summary.txt", table + "\n")
    recorder.write_json("classes.json", list(ds.classes))
    recorder.write_json("preprocess.json", preprocess.to_dict())
    recorder.write_json("meta.json", {**environment(device, argv), "data": ds.describe(), "source": source,
                                      "world_size": distributed.info().world, "params": count_params(model),
                                      "normalizer": {"mean": preprocess.mean, "std": preprocess.std}})
    if frozen:   # the checkpoints hold the head; the rebuilt model is this backbone + that head
        recorder.save_checkpoint("backbone.pt", {"model": model.backbone.state_dict()})


def standard_callbacks(cfg: Config, recorder: RunRecorder, progress: str, has_val: bool, identity: dict):
    """(checkpoint, early stopping or None, the list in call order): progress, early stopping, checkpoints,
    history, trackers. Early stopping decides before the checkpoint is written, so last.pt holds its state."""
    head = cfg.train.head_epochs
    es = cfg.early_stopping
    start = max(es.start_from_epoch, head) if es.enabled else head
    stopper = EarlyStopping.from_config(es, start_from_epoch=start) if es.enabled else None
    checkpoint = ModelCheckpoint(recorder, make_monitor(es, cfg.checkpoint, has_val), cfg.train.checkpoint_every,
                                 start_from_epoch=start, identity=identity)
    shown = {"bar": [ProgressBar(cfg.name)], "line": [PrintLogger()]}.get(progress, [])
    return checkpoint, stopper, [*shown, *([stopper] if stopper else []), checkpoint, HistoryWriter(recorder),
                                 TrackerLogger(recorder)]


def restore(trainer: Trainer, run: RunFolder, identity: dict, device: torch.device, cfg: Config) -> None:
    path = run.checkpoints / "last.pt"
    state = load_checkpoint(path, map_location=device)
    check_identity(path, state.get("identity"), identity)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit model {cfg.model.name!r} of config {cfg.name!r} "
                              f"({str(e).splitlines()[0][:200]})") from None


def checkpoint_identity(cfg: Config, num_classes: int) -> dict:
    """What a checkpoint belongs to; compared on resume so a swapped file gives a clear error."""
    return {"config": cfg.name, "model": cfg.model.name, "num_classes": num_classes,
            "freeze_backbone": cfg.train.freeze_backbone}


def check_identity(path: Path, found: dict | None, expected: dict) -> None:
    if found is not None and found != expected:
        raise CheckpointError(f"{path}: this checkpoint is from config {found.get('config')!r} (model "
                              f"{found.get('model')!r}, {found.get('num_classes')} classes), but the run is config "
                              f"{expected['config']!r} (model {expected['model']!r}, {expected['num_classes']} classes)")


def finish(trainer: Trainer, fitted: FitResult, splits: Splits, test_images: torch.Tensor, classes: list[str],
           checkpoint: ModelCheckpoint, stopper: EarlyStopping | None, recorder: RunRecorder, cfg: Config,
           notes: list[str], extra: dict) -> Results:
    """Score the reported weights (restored best, else last) on the test split, write the results and figures."""
    from cnnlab.records.evaluation import evaluate_logits, write_evaluation
    seconds = sum(h["seconds"] for h in trainer.history)
    restored = bool(stopper and stopper.restored)
    res = Results(name=cfg.name, status="diverged" if fitted.diverged else "ok", label=cfg.report.label or cfg.name,
                  model=cfg.model.name, optimizer=cfg.train.optimizer, batch_size=cfg.train.batch_size, seed=cfg.seed,
                  epochs_max=cfg.train.epochs, epochs_run=trainer.epoch, best_epoch=checkpoint.best_epoch,
                  stopped_early=fitted.stopped_early, restored_best_weights=restored,
                  weights="best" if restored else "last", seconds=round(seconds, 3),
                  train_images_per_second=round(len(splits.train) * trainer.epoch / max(seconds, 1e-9), 1),
                  reference_accuracy=cfg.report.reference_accuracy, reference_loss=cfg.report.reference_loss,
                  warnings=notes, extra=extra)
    if fitted.diverged:
        res.reason = f"loss became {trainer.history[-1]['loss']} at epoch {trainer.epoch}; lower [train] lr"
    else:
        res.test_loss, res.test_accuracy, logits = trainer.score(splits.test, tta=True)
        if recorder.active and len(splits.test):
            if logits is None:                     # under DDP: the whole split, on the main process
                logits = trainer.predict_logits(splits.test, tta=True)
            ev = evaluate_logits(logits, splits.test.y, classes)
            res.test_top5, res.test_macro_f1 = ev.top5, ev.macro_f1
            recorder.call(write_evaluation, ev, test_images.cpu(), title=res.label)
    recorder.write_results(res)
    if trainer.history:
        recorder.call(lambda path: plot_curves(trainer.history, path, res.label))
    return res


def say_result(res: Results, path: Path) -> None:
    if res.status == "diverged":
        print(f"!! {res.name}: DIVERGED ({res.reason})")
    else:
        top5 = f"  top-5 {res.test_top5:.4f}" if res.test_top5 is not None else ""
        print(f"== {res.name}: test accuracy {res.test_accuracy:.4f}{top5}  test loss {res.test_loss:.4f}  "
              f"({res.epochs_run} epochs, {res.seconds:.1f}s)  -> {path}")
