"""Use what you trained, from Python (scripts, Jupyter, Colab) and from the `cnnlab` command alike.

    import cnnlab
    run = cnnlab.run("practice/08_bnpre", data="cifar10s", train={"epochs": 5})   # train; returns a Run
    run.results["test_accuracy"]; run.history; run.plot()                      # numbers and curves inline
    model = cnnlab.load(run.path)            # or cnnlab.load("runs/bnpre-20261128-101500")
    model.predict(["cat.jpg", pil_image, uint8_array], topk=3)                  # [[("cat", 0.91), ...], ...]
    run.evaluate(data="cifar10s")            # re-score on other data with the same classes

Training is experiments/ (a run is a plan, then training); using what was trained is inference/ (loading,
predicting, evaluating, exporting). This module is the door to both from Python.
"""
from __future__ import annotations

from pathlib import Path

from cnnlab.config import Config, load_config, read_data_preset
from cnnlab.errors import ConfigError
from cnnlab.inference.export import export_run  # noqa: F401  (cnnlab.export_run)
from cnnlab.inference.model import Model, load_model  # noqa: F401  (cnnlab.load_model)
from cnnlab.records.io import read_json


def load(run_dir: str | Path, weights: str = "auto", device: str | None = None, trust_code: bool = False) -> Model:
    """A trained model from its run folder, ready to predict: `cnnlab.load("runs/best-...").predict("cat.jpg")`.
    trust_code=True: also a folder whose model is `package.module:function`, code it imports and runs (only
    for folders from someone you trust; README "Sharing a run")."""
    return Model(run_dir, weights, device, trust_code=trust_code)


# ---------------------------------------------------------------- runs and suites from Python

class Run:
    """A finished (or failed) run folder: `.results`, `.history`, `.config`, `.plot()`, `.predict`, `.evaluate`."""

    def __init__(self, path: str | Path, trust_code: bool = False):
        self.path = Path(path)
        self.trust_code = trust_code          # True for the runs cnnlab.run() just trained: the user's own code
        self._model: Model | None = None

    @property
    def results(self) -> dict:
        p = self.path / "results.json"
        return read_json(p) if p.is_file() else {}

    @property
    def status(self) -> str:
        """ok, diverged, failed; unfinished (killed, interrupted or still training: `.state` says at which
        epoch); not started (no epoch finished)."""
        return self.state.status

    @property
    def state(self):
        """Where the run stands (cnnlab.records.runs.RunState): status, epochs done of epochs, checkpoints."""
        from cnnlab.records.runs import RunFolder, run_state
        return run_state(RunFolder(self.path))

    @property
    def history(self) -> list[dict]:
        p = self.path / "history.json"
        return read_json(p) if p.is_file() else []

    @property
    def config(self) -> Config:
        return load_config(self.path / "config.toml")

    def model(self, weights: str = "auto") -> Model:
        if self._model is None or self._model.weights != weights:
            self._model = Model(self.path, weights, trust_code=self.trust_code)
        return self._model

    def predict(self, images, topk: int = 5):
        return self.model().predict(images, topk)

    def explain(self, images, layer: str | None = None, topk: int = 3):
        return self.model().explain(images, layer, topk)

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
        return f"cnnlab.Run({str(self.path)!r}, status={self.state.describe()!r}, test_accuracy={acc})"


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


def run(config: str | Path, *, data: str | dict | None = None, data_dir: str | None = None,
        runs_dir: str | Path = "runs", progress: str = "bar", callbacks: list = (), **overrides) -> Run | list[Run]:
    """Train one config (a file or a packaged name such as 'best'); keyword arguments override its values:
    `cnnlab.run("best", data="cifar10s", data_dir="~/data", train={"epochs": 5}, seed=1, callbacks=[...])`.
    data: a preset name or file (as --data), or a dict of [data] keys; with a preset, single [data] keys go in
    as dotted keywords: `**{"data.max_train_per_class": 250}` (as --set data.max_train_per_class=250).
    `seeds=N` (or the config's `seeds = N`) trains N runs, as `cnnlab run --seeds N` does, and returns their
    list; one seed returns its Run."""
    from cnnlab.configs import config_file
    from cnnlab.experiments.seeds import run_seeds
    data, overrides = _data_overrides(data, data_dir, overrides)
    path = config_file(str(config))
    cfg = load_config(path, _overrides(overrides), read_data_preset(data))
    runs = [Run(o.path or ".", trust_code=True) for o in run_seeds(cfg, runs_dir, source=str(path), progress=progress,
                                                   callbacks=list(callbacks))]
    return runs[0] if len(runs) == 1 else runs


class Suite:
    """A suite folder: `.runs` (one Run per row and seed), `.report` (report.md), `.table()` rows, `.plot()`."""

    def __init__(self, path: str | Path, failures: int = 0, trust_code: bool = False):
        self.path, self.failures, self.trust_code = Path(path), failures, trust_code

    @property
    def runs(self) -> list[Run]:
        return [Run(p.parent, self.trust_code) for p in sorted((self.path / "rows").glob("*/results.json"))]

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
    return Suite(folder, failures, trust_code=True)          # the user's own configs


def tune(config: str | Path | None = None, *, trials: int | None = None, resume: str | Path | None = None,
         storage: str | None = None, jobs: int | None = None, metric: str = "val_accuracy", pruner="median",
         data: str | dict | None = None, data_dir: str | None = None, runs_dir: str | Path = "runs",
         progress: str = "none", callbacks: list = (), **overrides):
    """Choose a config's [tune] values on its validation split (`cnnlab tune`): a new study of `trials` trials,
    or `resume=STUDY_DIR` to continue one. `pruner`: median, hyperband, none, or an Optuna pruner object (this
    process only). Returns a cnnlab.tuning.tune.TuneResult: .path, .summary (study.json), .best_config."""
    from cnnlab.configs import config_file
    from cnnlab.tuning import tune as tuning
    given = pruner if not isinstance(pruner, str) else None
    if resume is None:
        if config is None or trials is None:
            raise ConfigError("cnnlab.tune: give a config and trials=N, or resume=STUDY_DIR")
        data, overrides = _data_overrides(data, data_dir, overrides)
        path = config_file(str(config))
        cfg = load_config(path, _overrides(overrides), read_data_preset(data))
        name = pruner if given is None else f"python:{type(given).__name__}"
        resume = tuning.start(cfg, path, runs_dir, trials=trials, storage=storage, metric=metric, pruner=name)
    return tuning.tune(Path(resume), trials=trials, storage=storage, jobs=jobs, progress=progress, pruner=given,
                       callbacks=list(callbacks))


def lr_find(config: str | Path, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            out: str | Path | None = None, data: str | dict | None = None, data_dir: str | None = None,
            runs_dir: str | Path = "runs", progress: str = "bar", **overrides):
    """The learning-rate range test of a config (`cnnlab lr-find`): returns a cnnlab.tuning.lr_find.LRFind
    (.suggestion by fastai's valley rule, .lrs, .losses, .path with lr_find.png and lr_find.json)."""
    from cnnlab.configs import config_file
    from cnnlab.tuning.lr_find import run_lr_find
    data, overrides = _data_overrides(data, data_dir, overrides)
    path = config_file(str(config))
    cfg = load_config(path, _overrides(overrides), read_data_preset(data))
    return run_lr_find(cfg, out, runs_dir, start_lr=start_lr, end_lr=end_lr, steps=steps, progress=progress)
