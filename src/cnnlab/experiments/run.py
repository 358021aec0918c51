"""A run, step two: training the plan, then the test evaluation and the run folder.

    plan = prepare(cfg)                          # experiments/plan.py: nothing trained, nothing written
    outcome = train(plan, RunRecorder(folder))   # fit, score the reported weights on the test split, record

`run_experiment` is both steps for one config, as the CLI, suites and `cnnlab.run` use them. Under torchrun every
rank runs it; only rank 0 writes (its RunRecorder is the only real one).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.config import Config, to_dict
from cnnlab.data.augment import Augmenter
from cnnlab.data.preprocess import Preprocess
from cnnlab.errors import CheckpointError, RunInterrupted
from cnnlab.experiments.plan import DataCache, Plan
from cnnlab.experiments.prepare import prepare
from cnnlab.models import count_params, init_from_data, layers_set_from_data
from cnnlab.models.plugins import model_code, module_to_record
from cnnlab.records.io import load_checkpoint, read_json
from cnnlab.records.meta import environment
from cnnlab.records.plots import plot_curves
from cnnlab.records.runs import Results, RunFolder, RunRecorder
from cnnlab.runtime import distributed
from cnnlab.training.callbacks import (Callback, EarlyStopping, HistoryWriter, ModelCheckpoint, PrintLogger,
                                       ProgressBar, TrackerLogger, make_monitor)
from cnnlab.training.engine import FitResult, Split, Trainer, fit
from cnnlab.wording import plural

SEARCH_FILE = "search.json"      # what [search] chose, so a resumed run trains with the same values


@dataclass
class RunOutcome:
    """What a run hands back, on every rank: the run folder (None on ranks > 0) and its results."""
    path: Path | None
    results: Results
    history: list[dict]


@dataclass
class StandardCallbacks:
    """The callbacks every run has, in call order: progress, early stopping, checkpoints, history, trackers.
    Early stopping decides before the checkpoint is written, so last.pt holds its state."""
    checkpoint: ModelCheckpoint
    stopper: EarlyStopping | None
    all: list[Callback]


def run_experiment(cfg: Config, runs_dir: str | Path, *, source: str = "<config>", progress: str = "bar",
                   data_cache: DataCache | None = None, argv: list[str] | None = None,
                   resume: RunFolder | None = None, folder: RunFolder | None = None,
                   callbacks: list[Callback] = (), table: bool = True) -> RunOutcome:
    """Run one config (or resume the run in `resume`); `folder`: an existing empty folder to write into;
    `table`: print the layer table (else one line of parameter counts: suites print one per row)."""
    main = distributed.init_from_env().is_main
    progress = progress if main else "none"
    plan = prepare(cfg, source=source, progress=progress, data_cache=data_cache, resume=resume is not None)
    if resume:
        plan = chosen_earlier(plan, resume)
    recorder = RunRecorder((resume or folder or RunFolder.create(runs_dir, cfg.name)) if main else None)
    try:
        if not resume:
            record_start(recorder, plan, argv)
        return train(plan, recorder, callbacks, progress=progress, resume=resume, table=table)
    finally:
        recorder.close()


def train(plan: Plan, recorder: RunRecorder, callbacks: list[Callback] = (), *, progress: str = "bar",
          resume: RunFolder | None = None, table: bool = True) -> RunOutcome:
    """Fit the plan's trained module, score the reported weights on the test split, write the results."""
    cfg = plan.cfg
    recorder.start_trackers(cfg.tracking.loggers, to_dict(cfg), cfg.tracking.mlflow_uri)
    for note in plan.notes:
        print(f"warning: {cfg.name}: {note}")
    if progress == "bar":
        print(f"\n== {cfg.name}: {plan.data.describe()}; {len(plan.splits.train)} train / {len(plan.splits.val)} val "
              f"-> {recorder.path}")
        print(plan.table if table else params_line(plan.table, plan.cfg.model.label))
    if not resume:
        init_layers_from_data(plan.trained, plan.splits.train, plan.preprocess)
    trainer = Trainer(plan.trained, plan.train_config, plan.device, cfg.seed, plan.preprocess,
                      Augmenter(cfg.augment, plan.size), test_flip=cfg.augment.test_flip,
                      test_shift=cfg.augment.test_shift, **imbalance(plan))
    if resume:
        restore(trainer, resume, plan)
    standard = standard_callbacks(plan, recorder, progress)
    try:
        fitted = fit(trainer, plan.splits.train, plan.splits.val, standard.all + list(callbacks))
    except KeyboardInterrupt:
        raise RunInterrupted(recorder.path or "") from None
    if plan.solved:      # no epoch ran, so no checkpoint was written: the solved weights are the run's
        recorder.save_checkpoint("last.pt", {**trainer.state_dict(), "identity": plan.identity})
    results = finish(plan, trainer, fitted, standard, recorder)
    if progress != "none":
        say_result(results, recorder.path)
    return RunOutcome(recorder.path, results, trainer.history)


# ---------------------------------------------------------------- steps

def params_line(table: str, model: str) -> str:
    """The layer table's counts on one line: "basenet: Total params: 1,234, Trainable params: 1,234 (layers:
    summary.txt)"."""
    counts = [line for line in table.splitlines() if line.startswith(("Total params", "Trainable params"))]
    return f"{model}: {', '.join(counts)} (the layer table: summary.txt, or -v)"


def init_layers_from_data(model: torch.nn.Module, train: Split, preprocess: Preprocess, n: int = 5000) -> None:
    """Layers set from the training images before the first step (airnet's patch whitening): from at most `n`
    images spread evenly over the training split (an image folder's records are sorted by class), as the
    network sees them (the run's Preprocess, no augmentation). Deterministic per seed."""
    if not layers_set_from_data(model) or not len(train):          # no images gathered for nothing
        return
    picks = torch.arange(0, len(train), -(-len(train) // n))
    xb, _ = next(iter(train.batches(picks, [slice(0, len(picks))])))
    init_from_data(model, preprocess(xb, channels_last=False).to(next(model.parameters()).device))


def imbalance(plan: Plan) -> dict:
    """The Trainer's class_weight and sampler for [train] class_weights and [data] sampler; the weights and the
    training split's class counts go into results.json (train_support, class_weights)."""
    from cnnlab.data.sampler import make_sampler
    from cnnlab.training.weights import class_weights, describe
    y, classes = plan.data.y_train[plan.tr_idx], list(plan.data.classes)
    weights = class_weights(plan.cfg.train.class_weights, y, classes, plan.source)
    counts = torch.bincount(y, minlength=len(classes)).tolist()
    plan.extra = {**plan.extra, "train_support": dict(zip(classes, counts)),
                  **({"class_weights": describe(weights, classes)} if weights is not None else {})}
    return {"class_weight": weights, "sampler": make_sampler(plan.cfg.data.sampler, y, plan.cfg.seed)}


def record_start(recorder: RunRecorder, plan: Plan, argv) -> None:
    """Everything a later command needs to rebuild the model and its inputs from the folder alone. config.toml
    is the config as given plus what the run chose, said as such: the lr an omitted `lr` resolved to, and the
    [train] values [search] chose on validation (search.json has the trials; a rerun searches again)."""
    cfg = plan.cfg
    resolved = to_dict(cfg)
    resolved["train"].update(lr=cfg.train.effective_lr, **plan.chosen)
    resolved["model"]["module"] = module_to_record(cfg.model)    # a net registered from Python: where it lives
    chosen = ", ".join(f"{k} = {v:g}" for k, v in plan.chosen.items())
    recorder.write_config(resolved, f"[train] {chosen}: chosen on the validation split by [search] ({SEARCH_FILE})"
                          if chosen else "")
    recorder.write_text("summary.txt", plan.table + "\n")
    recorder.write_json("classes.json", list(plan.data.classes))
    recorder.write_skipped(plan.data.skipped)            # [data] skip_corrupt: the images left out
    recorder.write_json("preprocess.json", plan.preprocess.to_dict())
    recorder.write_json("meta.json", {**environment(plan.device, argv), "data": plan.data.describe(),
                                      "source": plan.source, "world_size": distributed.info().world,
                                      "splits": {k: len(getattr(plan.splits, k)) for k in ("train", "val", "test")},
                                      "params": count_params(plan.model),
                                      "normalizer": {"mean": plan.preprocess.mean, "std": plan.preprocess.std},
                                      "model_code": model_code(cfg.model)})
    if plan.chosen:
        recorder.write_json(SEARCH_FILE, {k: plan.extra[k] for k in ("chosen", "search", "search_seconds")})
    if plan.frozen:   # the checkpoints hold the head; the rebuilt model is this backbone + that head
        recorder.save_checkpoint("backbone.pt", {"model": plan.model.backbone.state_dict()})


def chosen_earlier(plan: Plan, run: RunFolder) -> Plan:
    """A resumed run trains with what its first attempt chose on validation (its search is not run again)."""
    path = run.path / SEARCH_FILE
    if not path.is_file():
        return plan
    record = read_json(path)
    plan.chosen, plan.extra = dict(record["chosen"]), {**plan.extra, **record}
    return plan


def standard_callbacks(plan: Plan, recorder: RunRecorder, progress: str) -> StandardCallbacks:
    cfg = plan.cfg
    head, es = cfg.train.head_epochs, cfg.early_stopping
    start = max(es.start_from_epoch, head) if es.enabled else head
    stopper = EarlyStopping.from_config(es, start_from_epoch=start) if es.enabled else None
    checkpoint = ModelCheckpoint(recorder, make_monitor(es, cfg.checkpoint, len(plan.splits.val) > 0),
                                 cfg.train.checkpoint_every, start_from_epoch=start, identity=plan.identity)
    shown = {"bar": [ProgressBar(cfg.name)], "line": [PrintLogger()]}.get(progress, [])
    return StandardCallbacks(checkpoint, stopper, [*shown, *([stopper] if stopper else []), checkpoint,
                                                   HistoryWriter(recorder), TrackerLogger(recorder)])


def restore(trainer: Trainer, run: RunFolder, plan: Plan) -> None:
    path = run.checkpoints / "last.pt"
    state = load_checkpoint(path, map_location=plan.device)
    check_identity(path, state.get("identity"), plan.identity)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit model {plan.cfg.model.label!r} of config {plan.cfg.name!r} "
                              f"({str(e).splitlines()[0][:200]})") from None


def check_identity(path: Path, found: dict | None, expected: dict) -> None:
    if found is not None and found != expected:
        raise CheckpointError(f"{path}: this checkpoint is from config {found.get('config')!r} (model "
                              f"{found.get('model')!r}, {found.get('num_classes')} classes), but the run is config "
                              f"{expected['config']!r} (model {expected['model']!r}, {expected['num_classes']} classes)")


def finish(plan: Plan, trainer: Trainer, fitted: FitResult, standard: StandardCallbacks,
           recorder: RunRecorder) -> Results:
    """Score the reported weights (restored best, else last) on the test split, write the results and figures."""
    from cnnlab.records.evaluation import evaluate_logits, write_evaluation
    cfg, test = plan.cfg, plan.splits.test
    seconds = sum(h["seconds"] for h in trainer.history) + plan.extra.get("logistic", {}).get("seconds", 0)
    restored = bool(standard.stopper and standard.stopper.restored)
    res = Results(name=cfg.name, status="diverged" if fitted.diverged else "ok", label=cfg.report.label or cfg.name,
                  model=cfg.model.label, optimizer=cfg.train.optimizer, batch_size=cfg.train.batch_size, seed=cfg.seed,
                  epochs_max=plan.train_config.epochs, epochs_run=trainer.epoch, best_epoch=standard.checkpoint.best_epoch,
                  stopped_early=fitted.stopped_early, restored_best_weights=restored,
                  weights="best" if restored else "last", seconds=round(seconds, 3),
                  train_images_per_second=round(len(plan.splits.train) * trainer.epoch / max(seconds, 1e-9), 1),
                  reference_accuracy=cfg.report.reference_accuracy, reference_loss=cfg.report.reference_loss,
                  warnings=plan.notes, extra=plan.extra)
    reported = (standard.checkpoint.best_epoch if restored else trainer.epoch) or 0
    if len(plan.splits.val) and 0 < reported <= len(trainer.history):     # the reported weights' validation
        res.val_loss = trainer.history[reported - 1].get("val_loss")
        res.val_accuracy = trainer.history[reported - 1].get("val_accuracy")
    if plan.solved:      # its validation is the cross-validation that chose C (every image was held out once)
        res.val_accuracy = plan.extra["logistic"]["cv_accuracy"]
    if fitted.diverged:
        res.reason = f"loss became {trainer.history[-1]['loss']} at epoch {trainer.epoch}; lower [train] lr"
    else:
        res.test_loss, res.test_accuracy, logits = trainer.score(test, tta=True)
        # how the scores were made (batching, layout, precision): `cnnlab evaluate` scores the same way
        res.extra = {**res.extra, "scoring": trainer.scoring.to_dict()}
        if recorder.active and len(test):
            if logits is None:                     # under DDP: the whole split, on the main process
                logits = trainer.predict_logits(test, tta=True)
            ev = evaluate_logits(logits, test.y, plan.data.classes)
            res.test_top5, res.test_macro_f1 = ev.top5, ev.macro_f1
            from cnnlab.inference.explain import error_overlays      # errors.png: what each error looked at
            heatmaps, note = error_overlays(plan.model, plan.preprocess, plan.test_images, ev.errors, plan.data.classes)
            if note:
                print(f"note: {cfg.name}: {note}")
                res.warnings = [*res.warnings, note]
            recorder.call(write_evaluation, ev, plan.test_images.cpu(), title=res.label, heatmaps=heatmaps)
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
              f"({plural(res.epochs_run, 'epoch')}, {res.seconds:.1f}s)  -> {path}")
