"""The `cnnlab` command: run, suite, report, models, configs.

Every user error (CnnlabError) becomes one line on stderr and exit code 2; a suite with a failed or
diverged row, or a diverged run, exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.errors import CnnlabError, RunInterrupted

if TYPE_CHECKING:
    from cnnlab.config import Config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--data", metavar="PRESET|FILE",
                   help="data preset or TOML file whose [data] keys replace the config's, e.g. --data cifar10s")
    p.add_argument("--data-dir", help="folder holding the data sets (default: $CNNLAB_DATA or ~/.cache/cnnlab/data)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are created (default: ./runs)")
    p.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    p.add_argument("--seeds", type=int, help="run each experiment with N seeds (seed, seed+1, ...): mean ± std and tests")
    p.add_argument("--device", help="shortcut for --set device=...; auto, cpu, cuda, cuda:N")
    p.add_argument("--logger", action="append", choices=["tensorboard", "mlflow"], default=[],
                   help="also log to TensorBoard or MLflow (repeatable; optional extras)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars: one line per epoch (for logs)")


def _overrides(a: argparse.Namespace) -> list[str]:
    out = list(a.overrides)
    if a.data_dir:
        out.append(f"data.data_dir={_toml_str(a.data_dir)}")
    if a.seed is not None:
        out.append(f"seed={a.seed}")
    if a.device:
        out.append(f"device={_toml_str(a.device)}")
    if a.seeds is not None:
        out.append(f"seeds={a.seeds}")
    if a.logger:
        out.append("tracking.loggers=[" + ", ".join(_toml_str(x) for x in dict.fromkeys(a.logger)) + "]")
    return out


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cnnlab", description="Convolutional-network image-classification experiments.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run one experiment from a config file or packaged config name")
    p.add_argument("config", nargs="?", help="a TOML file, or a packaged config such as 'best' or 'practice/01_sgd20'")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last checkpoint")
    _common(p)

    p = sub.add_parser("rerun", help="run again exactly what a run folder records (its resolved config)")
    p.add_argument("run_dir")
    _common(p)

    p = sub.add_parser("suite", help="run a suite of configs (e.g. 'practice') and write its report")
    p.add_argument("suite", nargs="?", help="a packaged suite name or a folder of TOML configs")
    p.add_argument("--only", help="comma-separated row names to run")
    p.add_argument("--resume", metavar="SUITE_DIR", help="continue a killed suite: finished rows are skipped")
    _common(p)

    p = sub.add_parser("report", help="(re)build the Markdown report of a suite or runs folder, without training")
    p.add_argument("folder")
    p.add_argument("-o", "--output", help="report file (default: FOLDER/report.md)")

    sub.add_parser("models", help="list the registered models with their parameter counts")
    sub.add_parser("configs", help="list packaged configs, suites and data presets")
    return ap


def _load(path: Path, a) -> Config:
    from cnnlab.config import load_config, read_toml
    from cnnlab.configs import data_preset
    preset = None
    if a.data:
        pp = data_preset(a.data)
        preset = (read_toml(pp), str(pp))
    return load_config(path, _overrides(a), preset)


def _execute(cfg, a, source: str, resume=None) -> int:
    import dataclasses

    from cnnlab.experiment import run_experiment
    status = []
    for s in range(1 if resume else cfg.seeds):
        run = run_experiment(dataclasses.replace(cfg, seed=cfg.seed + s), a.runs_dir, source=source,
                             progress="line" if a.quiet else "bar", argv=sys.argv, resume=resume)
        if run is None:        # a non-zero rank under torchrun: rank 0 reports
            return 0
        status.append(run.read_results() or {})
    if len(status) > 1:
        from cnnlab.report import _mean_std
        print(f"== {cfg.name} over {len(status)} seeds: test accuracy "
              f"{_mean_std([r.get('test_accuracy') for r in status if r.get('status') == 'ok'])}")
    return 0 if all(r.get("status") == "ok" for r in status) else 1


def cmd_run(a) -> int:
    from cnnlab.configs import config_file
    if a.resume:
        return cmd_resume(a)
    if not a.config:
        raise CnnlabError("run: give a config (file or packaged name), or --resume RUN_DIR")
    path = config_file(a.config)
    return _execute(_load(path, a), a, str(path))


def _run_folder(path: str):
    from cnnlab.runs import RunFolder
    run = RunFolder(Path(path))
    if not (run.path / "config.toml").is_file():
        raise CnnlabError(f"{run.path}: not a run folder (no config.toml)")
    return run


def cmd_resume(a) -> int:
    run = _run_folder(a.resume)
    if (run.read_results() or {}).get("status") == "ok":
        raise CnnlabError(f"{run.path}: this run already finished; nothing to resume")
    if not (run.checkpoints / "last.pt").is_file():
        raise CnnlabError(f"{run.path}: no checkpoint yet (it stopped before its first epoch ended); "
                          f"start it again with: cnnlab rerun {run.path}")
    if a.overrides or a.data:
        raise CnnlabError("--resume continues the run as recorded; --set/--data cannot change it (use cnnlab rerun)")
    cfg = _load(run.path / "config.toml", a)
    print(f"resuming {run.path} from its last checkpoint")
    return _execute(cfg, a, str(run.path / "config.toml"), resume=run)


def cmd_rerun(a) -> int:
    run = _run_folder(a.run_dir)
    return _execute(_load(run.path / "config.toml", a), a, str(run.path / "config.toml"))


def cmd_suite(a) -> int:
    from cnnlab.suite import run_suite
    if not a.suite and not a.resume:
        raise CnnlabError("suite: give a suite name or folder, or --resume SUITE_DIR")
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    overrides = [o for o in _overrides(a) if not o.startswith("seeds=")]
    _, failures = run_suite(a.suite, a.runs_dir, overrides, a.data, only, "line" if a.quiet else "bar", sys.argv,
                            seeds=a.seeds, resume=a.resume)
    return 1 if failures else 0


def cmd_report(a) -> int:
    from cnnlab.report import write_report
    folder = Path(a.folder)
    if not folder.is_dir():
        raise CnnlabError(f"{folder}: no such folder (give a suite folder or a runs folder)")
    print(write_report(folder, out=a.output))
    return 0


def cmd_models(a) -> int:
    from cnnlab.models import create_model, describe, list_models
    from cnnlab.models.cifar import keras_param_count
    print(f"{'model':<18}{'params (25 classes, Keras count)':>34}  description")
    for name in list_models():
        n = keras_param_count(create_model(name, 25))
        print(f"{name:<18}{n:>34,}  {describe(name)}")
    print("\nAny timm or torchvision model name (e.g. resnet50) and package.module:function work as backbones.")
    return 0


def cmd_configs(a) -> int:
    from cnnlab.configs import ROOT, all_configs, suites
    print("configs:", *all_configs(), sep="\n  ")
    print("suites:", *suites(), sep="\n  ")
    print("data presets:", *sorted(p.stem for p in (ROOT / "data").glob("*.toml")), sep="\n  ")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "rerun": cmd_rerun, "suite": cmd_suite, "report": cmd_report, "models": cmd_models,
                "configs": cmd_configs}[a.cmd](a)
    except RunInterrupted as e:
        print(f"\ncnnlab: interrupted; the last finished epoch is saved. Resume with: cnnlab run --resume {e.path}",
              file=sys.stderr)
        return 130
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncnnlab: interrupted", file=sys.stderr)
        return 130
    finally:
        from cnnlab import distributed
        distributed.shutdown()
