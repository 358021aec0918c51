"""Optional experiment trackers, on top of the run folder (which always has everything).

  --logger tensorboard   event files in <run>/tensorboard (`tensorboard --logdir runs`)
  --logger mlflow        an MLflow run: params, per-epoch metrics, test metrics, curves; to a local store
                         (<runs dir>/mlruns) by default, or to [tracking] mlflow_uri / $MLFLOW_TRACKING_URI.
Each is an optional extra: `pip install 'cnnlab[tensorboard]'` or `'cnnlab[mlflow]'`.
"""
from __future__ import annotations

import os
from pathlib import Path

from cnnlab.errors import ConfigError

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class TensorBoardTracker:
    def __init__(self, run_path: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--logger tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in _flatten(config).items()))

    def log_epoch(self, logs: dict) -> None:
        for k in METRICS:
            if k in logs:
                self.writer.add_scalar(k, logs[k], logs["epoch"])

    def log_results(self, results: dict, run_path: Path) -> None:
        for k in ("test_loss", "test_accuracy"):
            if isinstance(results.get(k), float):
                self.writer.add_scalar(k, results[k], results.get("epochs_run", 0))

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_path: Path, config: dict, uri: str):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--logger mlflow needs the mlflow package: pip install 'cnnlab[mlflow]'") from None
        self.mlflow = mlflow
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A plain local folder needs no database server nor SQLAlchemy; MLflow 3 asks for an explicit opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_path.parent.resolve() / "mlruns").as_uri()
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("cnnlab")
            self.run = mlflow.start_run(run_name=run_path.name)
        except Exception as e:  # noqa: BLE001 - mlflow raises many types for a bad URI/store
            raise ConfigError(f"--logger mlflow: cannot use tracking URI {uri!r} ({str(e).splitlines()[0][:200]})") from None
        params = {k: str(v)[:500] for k, v in _flatten(config).items()}
        mlflow.log_params(params)
        mlflow.set_tag("cnnlab.run_folder", str(run_path.resolve()))

    def log_epoch(self, logs: dict) -> None:
        self.mlflow.log_metrics({k: float(logs[k]) for k in METRICS if k in logs}, step=int(logs["epoch"]))

    def log_results(self, results: dict, run_path: Path) -> None:
        self.mlflow.log_metrics({k: float(results[k]) for k in ("test_loss", "test_accuracy")
                                 if isinstance(results.get(k), float) and results[k] == results[k]})
        self.mlflow.set_tag("cnnlab.status", results.get("status", "?"))
        for name in ("accuracy.png", "loss.png", "results.json", "config.toml"):
            if (run_path / name).is_file():
                self.mlflow.log_artifact(str(run_path / name))

    def close(self) -> None:
        self.mlflow.end_run()


def make_trackers(names: list[str], run_path: Path, config: dict, mlflow_uri: str = "") -> list:
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(run_path, config))
        elif name == "mlflow":
            out.append(MLflowTracker(run_path, config, mlflow_uri))
        else:
            raise ConfigError(f"logger {name!r}: choose tensorboard or mlflow")
    return out
