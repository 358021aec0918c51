"""`cnnlab evaluate`: re-score trained runs on their own data or other data with the same classes.

One run scores exactly as it scored itself (models/forward.py: the run's Preprocess, batching rule, layout and
precision, the weights its results came from): on its own test split, evaluation.json equals results.json.
Several runs score as an ensemble: the mean of their predicted probabilities.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cnnlab.config import Config, apply_dict, read_data_preset
from cnnlab.errors import CnnlabError, DataError


def eval_data(cfg: Config, data: str | None, data_dir: str | None) -> tuple[Config, str]:
    """The run's [data] table with a preset/file's [data] keys and --data-dir laid over it; and a short name."""
    new = dataclasses.replace(cfg.data)
    name = ""
    preset = read_data_preset(data)
    if preset:
        holder = dataclasses.replace(cfg, data=new)
        apply_dict(holder, {"data": preset[0].get("data", {})}, preset[1])
        new, name = holder.data, Path(data).stem
    if data_dir:
        new = dataclasses.replace(new, data_dir=data_dir)
    return dataclasses.replace(cfg, data=new), name


def check_same_classes(run_classes: list[str], data_classes: list[str], where: str) -> None:
    if run_classes == data_classes:
        return
    only_run = [c for c in run_classes if c not in data_classes]
    only_data = [c for c in data_classes if c not in run_classes]
    if not only_run and not only_data:
        raise DataError(f"{where}: the data has the run's classes in another order; the labels would not match "
                        f"(run: {', '.join(run_classes[:8])}...; data: {', '.join(data_classes[:8])}...)")
    raise DataError(f"{where}: the data's classes differ from the model's: only in the model: "
                    f"{', '.join(only_run[:10]) or 'none'}{' ...' if len(only_run) > 10 else ''}; only in the data: "
                    f"{', '.join(only_data[:10]) or 'none'}{' ...' if len(only_data) > 10 else ''}")


def model_logits(m, x: torch.Tensor, file=None) -> torch.Tensor:
    """A run's logits of uint8 images, on its device, by the one evaluation path (read batch by batch).
    `m`: a cnnlab.inference.model.Model (not imported here: a Model's .evaluate calls this module)."""
    from cnnlab.data.stream import Streamed, rows_of
    from cnnlab.models.forward import logits
    data = Streamed(rows_of(x, file), torch.zeros(len(x), dtype=torch.long, device=m.device), m.device)
    return logits(m.model, m.preprocess, data, m.scoring, m.device)


def evaluate_runs(models: list, data: str | None, data_dir: str | None, split: str, quiet: bool):
    """Score one model, or the average of several models' predicted probabilities (an ensemble: runs of
    other seeds or variants with the same classes), on the first run's data or other data with those
    classes. Returns (Evaluation, the folder it wrote, each model's own accuracy)."""
    from cnnlab.data import load_dataset, train_val_split
    from cnnlab.models import mean_probability_logits
    from cnnlab.records.evaluation import evaluate_logits, write_evaluation
    from cnnlab.inference.explain import error_overlays
    from cnnlab.records.io import write_json
    if split not in ("test", "val"):
        raise CnnlabError(f"--split {split!r}: choose test or val")
    first = models[0]
    cfg, name = eval_data(first.config, data, data_dir)
    if split == "val" and len({(m.config.seed, m.config.data.val_fraction, m.config.data.val_split) for m in models}) > 1:
        raise CnnlabError("--split val with several runs: their validation splits differ (other seeds or "
                          "val_fraction), so one run's validation images trained another; use --split test")
    ds = load_dataset(cfg.data, quiet=quiet)
    if split == "test":
        x, y, file = ds.x_test, ds.y_test, ds.files.get("x_test")
    else:
        _, va, _ = train_val_split(ds, cfg.data, cfg.seed)
        x, y, file = ds.x_train[va], ds.y_train[va], None
    per_model, own = [], []
    for m in models:
        check_same_classes(m.classes, ds.classes, f"evaluate {m.run_dir}")
        if ds.x_train.shape[-1] != m.preprocess.image_size:
            raise DataError(f"evaluate {m.run_dir}: the data's images are {ds.x_train.shape[-1]}px but the model's "
                            f"pipeline expects {m.preprocess.image_size}px; set [data] image_size = {m.preprocess.image_size}")
        logits = model_logits(m, x, file).to(first.device)
        own.append((logits.argmax(1).cpu() == y).float().mean().item())
        per_model.append(logits)
    scores = per_model[0] if len(models) == 1 else mean_probability_logits(torch.stack(per_model, 1), dim=1)
    ev = evaluate_logits(scores, y.to(first.device), first.classes)
    what = f"ensemble{len(models)}-" if len(models) > 1 else ""
    folder = first.run_dir / (f"eval-{what}{name}-{split}" if name else f"eval-{what}{split}")
    title = (f"{first.config.name}" if len(models) == 1 else f"ensemble of {len(models)} runs") + \
        f" on {name or 'its own data'} ({split})"
    heatmaps, note = (None, "errors.png: no Grad-CAM heatmaps for an ensemble (they are one network's)") \
        if len(models) > 1 else error_overlays(first.model, first.preprocess, x, ev.errors, first.classes)
    if note and not quiet:
        print(f"note: {note}")
    write_evaluation(folder, ev, x, title=title, heatmaps=heatmaps)
    from cnnlab.records.runs import RunFolder, run_state
    scored = lambda m: {"weights": m.weights, "weights_file": m.weights_file, "epoch": m.epoch,  # noqa: E731
                        "run_status": run_state(RunFolder(m.run_dir)).describe()}    # an unfinished run says so
    write_json(folder / "evaluation.json", {"data": name or "the run's own", "split": split, **scored(first),
                                            "n": ev.n, "loss": ev.loss, "accuracy": ev.top1, "top5": ev.top5,
                                            "macro_f1": ev.macro_f1,
                                            **({"runs": [{"run": str(m.run_dir), **scored(m), "accuracy": a}
                                                         for m, a in zip(models, own)]} if len(models) > 1 else {})})
    return ev, folder, own
