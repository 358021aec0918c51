"""The `cnnlab` command: run, suite, report, evaluate, predict, export, models, configs.

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
    p.add_argument("--deterministic", action="store_true",
                   help="shortcut for --set train.deterministic=true: one fixed CPU thread count instead of "
                        "following the machine's load, and torch's deterministic algorithms (slower under load)")


def _overrides(a: argparse.Namespace) -> list:
    """--set strings (parsed as TOML values), then the typed shortcuts (--data-dir, --seed, ...)."""
    from cnnlab.config import parse_set
    out: list = [parse_set(item) for item in a.overrides]
    if a.data_dir:
        out.append(("data.data_dir", a.data_dir))
    if a.seed is not None:
        out.append(("seed", a.seed))
    if a.device:
        out.append(("device", a.device))
    if a.seeds is not None:
        out.append(("seeds", a.seeds))
    if a.logger:
        out.append(("tracking.loggers", list(dict.fromkeys(a.logger))))
    if a.deterministic:
        out.append(("train.deterministic", True))
    return out


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="rebuild a run folder whose model is package.module:function: imports and runs that code, "
                        "so only for folders from someone you trust (README: Sharing a run)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cnnlab", description="Convolutional-network image-classification experiments.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run one experiment from a config file or packaged config name")
    p.add_argument("config", nargs="?", help="a TOML file, or a packaged config such as 'best' or 'practice/01_sgd20'")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last checkpoint")
    _trust_flag(p)
    _common(p)

    p = sub.add_parser("rerun", help="run again exactly what a run folder records (its resolved config)")
    p.add_argument("run_dir")
    _trust_flag(p)
    _common(p)

    p = sub.add_parser("suite", help="run a suite of configs (e.g. 'practice') and write its report")
    p.add_argument("suite", nargs="?", help="a packaged suite name or a folder of TOML configs")
    p.add_argument("--only", help="comma-separated row names to run")
    p.add_argument("--resume", metavar="SUITE_DIR", help="continue a killed suite: finished rows are skipped")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N rows at a time, each its own process with 1/N of the cores (small nets: faster "
                        "in total; one line per row instead of progress bars)")
    _common(p)

    p = sub.add_parser("report", help="(re)build the Markdown report of a suite or runs folder, without training")
    p.add_argument("folder")
    p.add_argument("-o", "--output", help="report file (default: FOLDER/report.md)")

    p = sub.add_parser("evaluate", help="re-score a trained run on its own data or other data with the same classes; "
                                        "with several runs, score the average of their predictions")
    p.add_argument("run_dir", nargs="+", help="a run folder; several: an ensemble (the mean of their probabilities)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"],
                   help="auto: what the run reported (best when restored, else last)")
    p.add_argument("--data", metavar="PRESET|FILE", help="data preset or TOML file whose [data] keys replace the run's")
    p.add_argument("--data-dir", help="folder holding the data sets")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--device", default="auto")
    _trust_flag(p)

    p = sub.add_parser("predict", help="classify image files or folders with a trained run")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="also write the predictions to FILE.csv or FILE.json")
    p.add_argument("--batch-size", type=int, help="images decoded and scored at a time (default: the run's "
                                                  "evaluation batch)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"])
    p.add_argument("--device", default="auto")
    _trust_flag(p)

    p = sub.add_parser("export", help="export a trained run to ONNX or TorchScript (uint8 RGB in, probabilities out)")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default: RUN/export/model.onnx or model.pt)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"])
    _trust_flag(p)

    sub.add_parser("models", help="list the registered models with their parameter counts")
    sub.add_parser("configs", help="list packaged configs, suites and data presets")
    return ap


def _load(path: Path, a) -> Config:
    from cnnlab.config import load_config, read_data_preset
    return load_config(path, _overrides(a), read_data_preset(a.data))


def _execute(cfg, a, source: str, resume=None) -> int:
    progress = "line" if a.quiet else "bar"
    if resume:
        from cnnlab.experiments.run import run_experiment
        outcomes = [run_experiment(cfg, a.runs_dir, source=source, progress=progress, argv=a.command, resume=resume)]
    else:
        from cnnlab.experiments.seeds import run_seeds
        outcomes = run_seeds(cfg, a.runs_dir, source=source, progress=progress, argv=a.command)
    return 0 if all(o.results.ok for o in outcomes) else 1


def cmd_run(a) -> int:
    from cnnlab.configs import config_file
    if a.resume:
        return cmd_resume(a)
    if not a.config:
        raise CnnlabError("run: give a config (file or packaged name), or --resume RUN_DIR")
    path = config_file(a.config)
    return _execute(_load(path, a), a, str(path))


def _run_folder(path: str):
    from cnnlab.records.runs import RunFolder
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
    _check_trusted(cfg, a, run.path)
    print(f"resuming {run.path} from its last checkpoint")
    return _execute(cfg, a, str(run.path / "config.toml"), resume=run)


def cmd_rerun(a) -> int:
    run = _run_folder(a.run_dir)
    cfg = _load(run.path / "config.toml", a)
    _check_trusted(cfg, a, run.path)
    return _execute(cfg, a, str(run.path / "config.toml"))


def _check_trusted(cfg: Config, a, run_dir: Path) -> None:
    """A run folder's `package.module:function` model runs only with --trust-code (cnnlab.models.trust)."""
    from cnnlab.models.trust import check_trusted
    check_trusted(cfg.model, a.trust_code, str(run_dir / "config.toml"))


def cmd_suite(a) -> int:
    from cnnlab.experiments.suite import run_suite
    if not a.suite and not a.resume:
        raise CnnlabError("suite: give a suite name or folder, or --resume SUITE_DIR")
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    overrides = [o for o in _overrides(a) if o[0] != "seeds"]
    _, failures = run_suite(a.suite, a.runs_dir, overrides, a.data, only, "line" if a.quiet else "bar", a.command,
                            seeds=a.seeds, resume=a.resume, jobs=a.jobs)
    return 1 if failures else 0


def cmd_report(a) -> int:
    from cnnlab.records.report import write_report
    folder = Path(a.folder)
    if not folder.is_dir():
        raise CnnlabError(f"{folder}: no such folder (give a suite folder or a runs folder)")
    print(write_report(folder, out=a.output))
    return 0


def cmd_evaluate(a) -> int:
    from cnnlab.api import load
    from cnnlab.inference.evaluate import evaluate_runs
    models = [load(_run_folder(d).path, a.weights, a.device, trust_code=a.trust_code) for d in a.run_dir]
    ev, folder, own = evaluate_runs(models, a.data, a.data_dir, a.split, quiet=False)
    if len(models) > 1:
        for m, acc in zip(models, own):
            print(f"  {m.run_dir}: accuracy {acc:.4f}")
    top5 = f"  top-5 {ev.top5:.4f}" if ev.top5 is not None else ""
    what = models[0].config.name if len(models) == 1 else f"ensemble of {len(models)} runs"
    print(f"{what} on {a.data or 'its own data'} ({a.split}, {ev.n} images): accuracy {ev.top1:.4f}{top5}"
          f"  macro F1 {ev.macro_f1:.4f}  loss {ev.loss:.4f}")
    from cnnlab.records.evaluation import most_confused_pairs
    pairs = most_confused_pairs(ev.confusion, ev.classes, 3)
    if pairs:
        print("most confused: " + "; ".join(f"{p['true']} -> {p['pred']} ({p['rate']:.1%})" for p in pairs))
    print(f"-> {folder}")
    return 0


def cmd_predict(a) -> int:
    from cnnlab.api import load
    from cnnlab.inference.predict import check_predictions_path, format_table, predict_files, write_predictions
    if a.out:
        check_predictions_path(Path(a.out))
    if a.topk < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise CnnlabError("--topk and --batch-size must be >= 1")
    model = load(_run_folder(a.run_dir).path, a.weights, a.device, trust_code=a.trust_code)
    rows, failures = predict_files(model._predictor, a.paths, a.topk, a.batch_size)
    if rows:
        print(format_table(rows, min(a.topk, len(model.classes))))
    for path, reason in failures:
        print(f"cnnlab: cannot predict {path}: {reason}", file=sys.stderr)
    if a.out:
        write_predictions(rows, Path(a.out))
        print(f"-> {a.out}")
    return 1 if failures else 0


def cmd_export(a) -> int:
    from cnnlab.inference.export import export_run
    path, diff = export_run(_run_folder(a.run_dir).path, a.format, a.out, a.weights, trust_code=a.trust_code)
    print(f"exported {path} (+ labels.json); max |difference| of probabilities vs PyTorch on real inputs: {diff:.2e}")
    from cnnlab.inference.export import check_tolerance
    check_tolerance(diff)
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
    from cnnlab.inference.export import ExportMismatch
    a = build_parser().parse_args(argv)
    # What a run folder records as its command: this process's, or the arguments main() was called with.
    a.command = list(sys.argv) if argv is None else ["cnnlab", *map(str, argv)]
    try:
        return {"run": cmd_run, "rerun": cmd_rerun, "suite": cmd_suite, "report": cmd_report, "models": cmd_models,
                "configs": cmd_configs, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export}[a.cmd](a)
    except RunInterrupted as e:
        what = "suite" if (Path(e.path) / "suite.json").is_file() else "run"
        print(f"\ncnnlab: interrupted; the last finished epoch is saved. Resume with: cnnlab {what} --resume {e.path}",
              file=sys.stderr)
        return 130
    except ExportMismatch as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 1
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncnnlab: interrupted", file=sys.stderr)
        return 130
    finally:
        from cnnlab.runtime import distributed
        distributed.shutdown()
