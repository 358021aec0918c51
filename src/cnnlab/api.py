"""Use what you trained, from Python (scripts, Jupyter, Colab) and from the `cnnlab` command alike.

    import cnnlab
    run = cnnlab.run("practice/08_bnpre", data="cifar10s", train={"epochs": 5})   # train; returns a Run
    run.results["test_accuracy"]; run.history; run.plot()                      # numbers and curves inline
    model = cnnlab.load(run.path)            # or cnnlab.load("runs/bnpre-20261128-101500")
    model.predict(["cat.jpg", pil_image, uint8_array], topk=3)                  # [[("cat", 0.91), ...], ...]
    run.evaluate(data="cifar10s")            # re-score on other data with the same classes

A run folder alone rebuilds the model: config.toml (the architecture), classes.json, preprocess.json,
and the checkpoints (frozen-feature runs: checkpoints/backbone.pt + the head's checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import Config, load_config, read_toml
from cnnlab.errors import CheckpointError, CnnlabError, DataError
from cnnlab.data.preprocess import Preprocess
from cnnlab.records.io import load_checkpoint, read_json


def _read(run_dir: Path, name: str):
    p = run_dir / name
    if not p.is_file():
        raise CnnlabError(f"{run_dir}: no {name}; is this a run folder made by cnnlab 0.2 or later? "
                          f"(older runs lack it: run them again with `cnnlab rerun {run_dir}`)")
    return read_json(p)


def load_model(run_dir: str | Path, weights: str = "auto", device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, Preprocess, list[str], Config]:
    """(model in eval mode, its input pipeline, class names, the run's config) from a run folder.

    weights: 'auto' (what the run reported: best when early stopping restored it, else last), 'best', 'last'."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CnnlabError(f"{run_dir}: not a run folder (no config.toml)")
    cfg = load_config(run_dir / "config.toml")
    classes, pre = _read(run_dir, "classes.json"), Preprocess.from_dict(_read(run_dir, "preprocess.json"))
    if weights == "auto":
        weights = (read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}).get("weights", "last")
    if weights not in ("best", "last"):
        raise CnnlabError(f"--weights {weights!r}: choose best, last or auto")
    from cnnlab.models.backbones import PreprocessingWarning
    from cnnlab.models.build import build_model, inference_model
    # The architecture only: the trained weights come from the run's own checkpoints (no download), and the
    # inputs from preprocess.json, so a backbone's undeclared mean/std does not matter here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreprocessingWarning)
        model, _, _ = build_model(dataclasses.replace(cfg.model, weights="none"), len(classes), pre.image_size)
    ckpt = run_dir / "checkpoints" / f"{weights}.pt"
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: not found (the run stopped before saving its {weights} weights); "
                              f"try --weights {'last' if weights == 'best' else 'best'}")
    state = load_checkpoint(ckpt)["model"]
    try:
        if cfg.train.freeze_backbone:
            model.backbone.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "backbone.pt")["model"])
            model.head.load_state_dict(state)
        else:
            model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: does not fit model {cfg.model.name!r} ({str(e).splitlines()[0][:200]})") from None
    model = inference_model(model, cfg.augment.test_flip, cfg.augment.test_shift)     # predictions as the run scored them
    return model.to(device).eval(), pre, list(classes), cfg


class Model:
    """A trained model with its classes and input pipeline: `.predict`, `.probabilities`, `.evaluate`."""

    def __init__(self, run_dir: str | Path, weights: str = "auto", device: str | torch.device | None = None,
                 batch_size: int = 64):
        from cnnlab.runtime.device import resolve_device
        from cnnlab.inference.predict import Predictor
        self.run_dir, self.weights = Path(run_dir), weights
        self.device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
        self.model, self.preprocess, self.classes, self.config = load_model(run_dir, weights, self.device)
        self._predictor = Predictor(self.model, self.preprocess, self.classes, self.device, batch_size)

    def predict(self, images, topk: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image: paths, PIL images, uint8 arrays (HWC) or tensors (CHW/NCHW)."""
        return self._predictor.predict(images, topk=topk)

    def probabilities(self, images) -> torch.Tensor:
        return self._predictor.probabilities(images)

    def evaluate(self, data: str | None = None, data_dir: str | None = None, split: str = "test", quiet: bool = True):
        """Re-score on the run's own data or other data with the same classes (`cnnlab evaluate`); returns
        (Evaluation, folder it wrote)."""
        return evaluate_run(self, data, data_dir, split, quiet)

    def __repr__(self) -> str:
        return f"cnnlab.Model({str(self.run_dir)!r}, {len(self.classes)} classes, input {self.preprocess.input_size}px)"


def load(run_dir: str | Path, weights: str = "auto", device: str | None = None) -> Model:
    """A trained model from its run folder, ready to predict: `cnnlab.load("runs/best-...").predict("cat.jpg")`."""
    return Model(run_dir, weights, device)


# ---------------------------------------------------------------- evaluation of a saved model

def eval_data(cfg: Config, data: str | None, data_dir: str | None) -> tuple[Config, str]:
    """The run's [data] table with a preset/file's [data] keys and --data-dir laid over it; and a short name."""
    new = dataclasses.replace(cfg.data)
    name = ""
    if data:
        from cnnlab.configs import data_preset
        from cnnlab.config import apply_dict
        p = data_preset(data)
        holder = dataclasses.replace(cfg, data=new)
        apply_dict(holder, {"data": read_toml(p).get("data", {})}, str(p))
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


@torch.no_grad()
def logits_of(model: nn.Module, pre: Preprocess, x_uint8: torch.Tensor, device: torch.device, bf16: bool,
              batch_size: int = 256) -> torch.Tensor:
    """Logits of uint8 images, batched; `batch_size` counts 32x32 inputs (larger ones: proportionally fewer,
    at least 16), so that a ResNet50 at 224 does not hold the activations of 256 images at once."""
    from cnnlab.runtime.device import autocast
    batch_size = max(min(batch_size, 16), batch_size * 32 * 32 // (pre.input_size ** 2))
    out = []
    for i in range(0, len(x_uint8), batch_size):
        with autocast(device, bf16):
            out.append(model(pre(x_uint8[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)


def evaluate_run(m: Model, data: str | None, data_dir: str | None, split: str, quiet: bool):
    ev, folder, _ = evaluate_runs([m], data, data_dir, split, quiet)
    return ev, folder


def evaluate_runs(models: list[Model], data: str | None, data_dir: str | None, split: str, quiet: bool):
    """Score one model, or the average of several models' predicted probabilities (an ensemble: runs of
    other seeds or variants with the same classes), on the first run's data or other data with those
    classes. Returns (Evaluation, the folder it wrote, each model's own accuracy)."""
    from cnnlab.data import load_dataset, split_train_val
    from cnnlab.runtime.device import use_bf16
    from cnnlab.records.evaluation import evaluate_logits, write_evaluation
    from cnnlab.models import mean_probability_logits
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
        x, y = ds.x_test, ds.y_test
    else:
        _, va = split_train_val(ds.y_train, cfg.data.val_fraction, cfg.data.val_split, cfg.seed)
        x, y = ds.x_train[va], ds.y_train[va]
    per_model, own = [], []
    for m in models:
        check_same_classes(m.classes, ds.classes, f"evaluate {m.run_dir}")
        if ds.x_train.shape[-1] != m.preprocess.image_size:
            raise DataError(f"evaluate {m.run_dir}: the data's images are {ds.x_train.shape[-1]}px but the model's "
                            f"pipeline expects {m.preprocess.image_size}px; set [data] image_size = {m.preprocess.image_size}")
        size = m.preprocess.input_size
        bf16 = use_bf16(cfg.train.precision, m.device, m.model, (16, 3, size, size), train=False)
        logits = logits_of(m.model, m.preprocess, x, m.device, bf16).to(first.device)
        own.append((logits.argmax(1).cpu() == y).float().mean().item())
        per_model.append(logits)
    scores = logits if len(models) == 1 else mean_probability_logits(torch.stack(per_model, 1), dim=1)
    ev = evaluate_logits(scores, y.to(first.device), first.classes)
    what = f"ensemble{len(models)}-" if len(models) > 1 else ""
    folder = first.run_dir / (f"eval-{what}{name}-{split}" if name else f"eval-{what}{split}")
    title = (f"{first.config.name}" if len(models) == 1 else f"ensemble of {len(models)} runs") + \
        f" on {name or 'its own data'} ({split})"
    write_evaluation(folder, ev, x, title=title)
    write_json(folder / "evaluation.json", {"data": name or "the run's own", "split": split, "weights": first.weights,
                                            "n": ev.n, "loss": ev.loss, "accuracy": ev.top1, "top5": ev.top5,
                                            "macro_f1": ev.macro_f1,
                                            **({"runs": [{"run": str(m.run_dir), "weights": m.weights, "accuracy": a}
                                                         for m, a in zip(models, own)]} if len(models) > 1 else {})})
    return ev, folder, own


# ---------------------------------------------------------------- export

def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, weights: str = "auto",
               n_check: int = 16) -> tuple[Path, float]:
    """Export a run's model (uint8 RGB in at its input size, probabilities out; labels.json beside it),
    checked against PyTorch on real test images of the run's data. Returns (file, max |difference|)."""
    from cnnlab.data import load_dataset
    from cnnlab.inference.export import export_model
    from cnnlab.data.preprocess import center_crop
    model, pre, classes, cfg = load_model(run_dir, weights, "cpu")
    try:
        ds = load_dataset(cfg.data, quiet=True)
    except CnnlabError as e:
        raise CnnlabError(f"export {run_dir}: the check needs real images of the run's data ({e})") from None
    x = ds.x_test[:n_check]
    if x.shape[-1] != pre.input_size:       # the exported file takes images already at the network's size
        x = center_crop(x.float(), pre.eval_crop, pre.input_size).round().clamp(0, 255).to(torch.uint8)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = Path(out) if out else Path(run_dir) / "export" / f"model{suffix}"
    return export_model(model, pre, classes, fmt, out, x)


# ---------------------------------------------------------------- runs and suites from Python

class Run:
    """A finished (or failed) run folder: `.results`, `.history`, `.config`, `.plot()`, `.predict`, `.evaluate`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._model: Model | None = None

    @property
    def results(self) -> dict:
        p = self.path / "results.json"
        return read_json(p) if p.is_file() else {}

    @property
    def history(self) -> list[dict]:
        p = self.path / "history.json"
        return read_json(p) if p.is_file() else []

    @property
    def config(self) -> Config:
        return load_config(self.path / "config.toml")

    def model(self, weights: str = "auto") -> Model:
        if self._model is None or self._model.weights != weights:
            self._model = Model(self.path, weights)
        return self._model

    def predict(self, images, topk: int = 5):
        return self.model().predict(images, topk)

    def evaluate(self, data: str | None = None, data_dir: str | None = None, split: str = "test"):
        return self.model().evaluate(data, data_dir, split)

    def plot(self):
        """Training curves (train vs validation accuracy and loss) as one matplotlib figure (inline in Jupyter)."""
        import matplotlib.pyplot as plt
        h = self.history
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, metric in zip(axes, ("accuracy", "loss")):
            ax.plot([e["epoch"] for e in h], [e[metric] for e in h], marker=".", label="train")
            if h and f"val_{metric}" in h[0]:
                ax.plot([e["epoch"] for e in h], [e[f"val_{metric}"] for e in h], marker=".", label="validation")
            ax.set(xlabel="epoch", ylabel=metric, title=f"{self.results.get('label', self.path.name)} {metric}")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        plt.close(fig)          # returned, not also shown a second time by the inline backend
        return fig

    def __repr__(self) -> str:
        r = self.results
        acc = r.get("test_accuracy")
        return f"cnnlab.Run({str(self.path)!r}, status={r.get('status')!r}, test_accuracy={acc})"


def _overrides(tables: dict) -> list:
    """run(..., train={"epochs": 5}, seed=1) -> [("train.epochs", 5), ("seed", 1)]."""
    out = []
    for key, value in tables.items():
        if isinstance(value, dict):
            out += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            out.append((key, value))
    return out


def _data_overrides(data: str | dict | None, data_dir: str | None, overrides: dict) -> tuple[str | None, dict]:
    """`data` is a preset name/file, or a dict of [data] keys; data_dir is the --data-dir shortcut."""
    extra = dict(overrides.get("data", {}))
    if isinstance(data, dict):
        extra.update(data)
        data = None
    if data_dir:
        extra["data_dir"] = str(data_dir)
    return data, ({**overrides, "data": extra} if extra else overrides)


def _preset(data: str | None):
    if not data:
        return None
    from cnnlab.configs import data_preset
    p = data_preset(data)
    return read_toml(p), str(p)


def run(config: str | Path, *, data: str | dict | None = None, data_dir: str | None = None,
        runs_dir: str | Path = "runs", progress: str = "bar", callbacks: list = (), **overrides) -> Run:
    """Train one config (a file or a packaged name such as 'best'); keyword arguments override its values:
    `cnnlab.run("best", data="cifar10s", data_dir="~/data", train={"epochs": 5}, seed=1, callbacks=[...])`.
    data: a preset name or file (as --data), or a dict of [data] keys; with a preset, single [data] keys go in
    as dotted keywords: `**{"data.max_train_per_class": 250}` (as --set data.max_train_per_class=250)."""
    from cnnlab.configs import config_file
    from cnnlab.experiments.run import run_experiment
    data, overrides = _data_overrides(data, data_dir, overrides)
    path = config_file(str(config))
    cfg = load_config(path, _overrides(overrides), _preset(data))
    out = run_experiment(cfg, runs_dir, source=str(path), progress=progress, callbacks=list(callbacks))
    return Run(out.path) if out.path else Run(".")


class Suite:
    """A suite folder: `.runs` (one Run per row and seed), `.report` (report.md), `.table()` rows, `.plot()`."""

    def __init__(self, path: str | Path, failures: int = 0):
        self.path, self.failures = Path(path), failures

    @property
    def runs(self) -> list[Run]:
        return [Run(p.parent) for p in sorted((self.path / "rows").glob("*/results.json"))]

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    def table(self) -> list[dict]:
        keys = ("name", "label", "seed", "status", "epochs_run", "test_accuracy", "test_top5", "test_loss", "seconds")
        return [{k: r.results.get(k) for k in keys} for r in self.runs]

    def plot(self):
        """Validation accuracy of every row, one line per run (inline in Jupyter)."""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in self.runs:
            h = r.history
            if h and "val_accuracy" in h[0]:
                ax.plot([e["epoch"] for e in h], [e["val_accuracy"] for e in h], marker=".", label=r.path.name)
        ax.set(xlabel="epoch", ylabel="validation accuracy", title=self.path.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        plt.close(fig)
        return fig

    def __repr__(self) -> str:
        return f"cnnlab.Suite({str(self.path)!r}, {len(self.runs)} runs, {self.failures} failed)"


def suite(name: str, *, data: str | dict | None = None, data_dir: str | None = None, runs_dir: str | Path = "runs",
          seeds: int | None = None, only: list[str] | None = None, progress: str = "bar", **overrides) -> Suite:
    """Run a suite ('practice', or a folder of configs): `cnnlab.suite("practice", data="cifar10s", train={"epochs": 2})`."""
    from cnnlab.experiments.suite import run_suite
    data, overrides = _data_overrides(data, data_dir, overrides)
    folder, failures = run_suite(name, runs_dir, _overrides(overrides), data, only, progress, seeds=seeds)
    return Suite(folder, failures)
