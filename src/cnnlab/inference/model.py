"""A trained model from its run folder: rebuilt, fed and scored exactly as the run scored its test images.

A run folder alone rebuilds the model: config.toml (the architecture), classes.json, preprocess.json (the input
pipeline), results.json's "scoring" (batching, layout, precision), and the checkpoints (frozen-feature runs:
checkpoints/backbone.pt + the head's checkpoint).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import Config, load_config
from cnnlab.data.preprocess import Preprocess
from cnnlab.errors import CheckpointError, CnnlabError
from cnnlab.models.forward import Scoring
from cnnlab.records.io import load_checkpoint, read_json


@dataclass
class LoadedRun:
    """What a run folder rebuilds: the scoring module (eval mode; test-time views included), its input pipeline,
    class names, the run's config, which weights file was loaded, and how the run scored."""
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    config: Config
    weights: str                  # best | last: the file actually loaded
    scoring: Scoring
    epoch: int | None = None      # the epoch whose weights these are (from the checkpoint)

    @property
    def weights_file(self) -> str:
        return f"checkpoints/{self.weights}.pt"

    def __iter__(self):
        """`model, preprocess, classes, config = load_model(run)`: the 4-tuple load_model returned before 0.3."""
        return iter((self.model, self.preprocess, self.classes, self.config))


def _read(run_dir: Path, name: str):
    p = run_dir / name
    if not p.is_file():
        raise CnnlabError(f"{run_dir}: no {name}; is this a run folder made by cnnlab 0.2 or later? "
                          f"(older runs lack it: run them again with `cnnlab rerun {run_dir}`)")
    return read_json(p)


def _optional(run_dir: Path, name: str) -> dict:
    """A run folder's JSON file, or {} where an older or unfinished run has none."""
    return read_json(run_dir / name) if (run_dir / name).is_file() else {}


def scoring_of(results: dict, meta: dict, cfg: Config, device: torch.device) -> Scoring:
    """How the run scored (results.json "scoring"), so later scores equal its own; its precision only on the
    same kind of device (a bf16 choice is per device), else fp32. Older runs: the rule from their config, fp32."""
    recorded = results.get("scoring")
    if not recorded:
        return Scoring(cfg.train.eval_batch_size, cfg.train.batch_size, cfg.train.channels_last, False)
    s = Scoring.from_dict(recorded)
    same_device = torch.device(meta.get("device", "cpu")).type == device.type
    return s if same_device else dataclasses.replace(s, bf16=False)


def load_model(run_dir: str | Path, weights: str = "auto", device: str | torch.device = "cpu",
               trust_code: bool = False) -> LoadedRun:
    """The run's model in eval mode, ready to score (see LoadedRun).

    weights: 'auto' (what the run reported: best when early stopping restored it, else last), 'best', 'last'.
    trust_code: rebuild a `package.module:function` model, which imports and runs code the folder names
    (models/trust.py); without it such a folder is refused before anything is imported."""
    run_dir = Path(run_dir)
    device = torch.device(device)
    if not (run_dir / "config.toml").is_file():
        raise CnnlabError(f"{run_dir}: not a run folder (no config.toml)")
    present = [w for w in ("best", "last") if (run_dir / "checkpoints" / f"{w}.pt").is_file()]
    ended = _optional(run_dir, "results.json")
    if not present and ended.get("status") == "failed":
        why = ended.get("reason") or "no reason recorded"
        raise CheckpointError(f"{run_dir}: the run failed before saving any weights ({why}); once that is fixed, "
                              f"train it again: cnnlab rerun {run_dir}")
    if not present:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (the run stopped before its first epoch ended, or is "
                              f"still in it): resume it with cnnlab run --resume {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    from cnnlab.models.trust import check_trusted
    check_trusted(cfg.model, trust_code, str(run_dir / "config.toml"))
    from cnnlab.models.plugins import import_run_code      # its code, or where it was when the run trained
    import_run_code(cfg.model, _optional(run_dir, "meta.json"), str(run_dir))
    classes, pre = _read(run_dir, "classes.json"), Preprocess.from_dict(_read(run_dir, "preprocess.json"))
    results = ended
    if weights == "auto":        # what the run's results come from: best when early stopping restored it, else last
        weights = results.get("weights", "last" if "last" in present else "best")   # unfinished: the latest
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
    if not ckpt.is_file():             # the other one exists (checked above): name only a file that is there
        raise CheckpointError(f"{ckpt}: not found (the run stopped before saving its {weights} weights); "
                              f"use --weights {present[0]}")
    saved = load_checkpoint(ckpt)
    state = saved["model"]
    backbone = run_dir / "checkpoints" / "backbone.pt"
    try:
        if backbone.is_file():          # a frozen-feature run: its checkpoints hold the head
            model.backbone.load_state_dict(load_checkpoint(backbone)["model"])
            model.head.load_state_dict(state)
        else:
            model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: does not fit model {cfg.model.label!r} ({str(e).splitlines()[0][:200]})") from None
    model = inference_model(model, cfg.augment.test_flip, cfg.augment.test_shift)     # as the run scored
    return LoadedRun(model.to(device).eval(), pre, list(classes), cfg, weights,
                     scoring_of(results, _optional(run_dir, "meta.json"), cfg, device), saved.get("epoch"))


class Model:
    """A trained model with its classes and input pipeline: `.predict`, `.probabilities`, `.evaluate`."""

    def __init__(self, run_dir: str | Path, weights: str = "auto", device: str | torch.device | None = None,
                 batch_size: int | None = None, trust_code: bool = False):
        from cnnlab.inference.predict import Predictor
        from cnnlab.runtime.device import resolve_device
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
        loaded = load_model(run_dir, weights, self.device, trust_code)
        self.model, self.preprocess, self.classes, self.config = loaded.model, loaded.preprocess, loaded.classes, loaded.config
        self.weights, self.scoring = loaded.weights, loaded.scoring
        self.weights_file, self.epoch = loaded.weights_file, loaded.epoch     # what was loaded, for the records
        self._predictor = Predictor(self.model, self.preprocess, self.classes, self.device, batch_size, self.scoring)

    def predict(self, images, topk: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image: paths, PIL images, uint8 arrays (HWC) or tensors (CHW/NCHW)."""
        return self._predictor.predict(images, topk=topk)

    def probabilities(self, images) -> torch.Tensor:
        return self._predictor.probabilities(images)

    def explain(self, images, layer: str | None = None, topk: int = 3) -> list:
        """Per image an Explanation: .top (label, probability) best first, .target (the top class), .heatmap
        (H, W) in [0, 1] of Grad-CAM for it over .image (what the network saw), .layer; inference/explain.py."""
        from cnnlab.inference.explain import explain
        return explain(self, images, layer, topk)

    def evaluate(self, data: str | None = None, data_dir: str | None = None, split: str = "test", quiet: bool = True):
        """Re-score on the run's own data or other data with the same classes (`cnnlab evaluate`); returns
        (Evaluation, folder it wrote)."""
        from cnnlab.inference.evaluate import evaluate_runs
        ev, folder, _ = evaluate_runs([self], data, data_dir, split, quiet)
        return ev, folder

    def __repr__(self) -> str:
        return f"cnnlab.Model({str(self.run_dir)!r}, {len(self.classes)} classes, input {self.preprocess.input_size}px)"
