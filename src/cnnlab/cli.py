"""The `cnnlab` command: run, suite, report, evaluate, predict, export, models, configs; explain (inference/explain_cli.py), tune and lr-find (tuning/cli.py).

Every user error (CnnlabError) becomes one line on stderr and exit code 2; a suite with a failed or
diverged row, or a diverged run, exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.cli_options import code_dirs, common, load_from_args, overrides_of, run_folder, trust_flag
from cnnlab.errors import CnnlabError, RunInterrupted
from cnnlab.inference import explain_cli     # light: no torch until `cnnlab explain` runs
from cnnlab.tuning import cli as tuning_cli  # light too: cnnlab tune, cnnlab lr-find

if TYPE_CHECKING:
    from cnnlab.config import Config


def _package_version() -> str:
    from cnnlab import __version__      # importlib.metadata: no torch import for `cnnlab --version`
    return __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cnnlab", description="Convolutional-network image-classification experiments.")
    ap.add_argument("--version", action="version", version=f"cnnlab {_package_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run one experiment from a config file or packaged config name")
    p.add_argument("config", nargs="?", help="a TOML file, or a packaged config such as 'best' or 'practice/01_sgd20'")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last checkpoint")
    trust_flag(p)
    common(p)

    p = sub.add_parser("rerun", help="run again exactly what a run folder records (its resolved config)")
    p.add_argument("run_dir")
    trust_flag(p)
    common(p)

    p = sub.add_parser("suite", help="run a suite of configs (e.g. 'practice') and write its report")
    p.add_argument("suite", nargs="?", help="a packaged suite name or a folder of TOML configs")
    p.add_argument("--only", help="comma-separated row names to run")
    p.add_argument("--resume", metavar="SUITE_DIR", help="continue a killed suite: finished rows are skipped")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N rows at a time, each its own process with 1/N of the cores (small nets: faster "
                        "in total; one line per row instead of progress bars)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each row's layer table (default: one line of parameter counts per row)")
    common(p)
    from cnnlab.experiments.launch import add_launcher_options    # --launcher, --slurm-* (no torch import)
    add_launcher_options(p)

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
    trust_flag(p)

    p = sub.add_parser("predict", help="classify image files or folders with a trained run")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="also write the predictions to FILE.csv or FILE.json")
    p.add_argument("--batch-size", type=int, help="images decoded and scored at a time (default: the run's "
                                                  "evaluation batch)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"])
    p.add_argument("--device", default="auto")
    trust_flag(p)

    p = sub.add_parser("export", help="export a trained run to ONNX or TorchScript (uint8 RGB in, probabilities out)")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default: RUN/export/model.onnx or model.pt)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"])
    trust_flag(p)

    explain_cli.add_parsers(sub)
    tuning_cli.add_parsers(sub)
    sub.add_parser("models", help="list the registered models with their parameter counts")
    sub.add_parser("configs", help="list packaged configs, suites and data presets")
    return ap


def _execute(cfg, a, source: str, resume=None, folder=None) -> int:
    progress = "line" if a.quiet else "bar"
    if resume or folder:
        from cnnlab.experiments.run import run_experiment
        outcomes = [run_experiment(cfg, a.runs_dir, source=source, progress=progress, argv=a.command, resume=resume,
                                   folder=folder)]
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
    return _execute(load_from_args(path, a), a, str(path))


def cmd_resume(a) -> int:
    run = run_folder(a.resume)
    if (run.read_results() or {}).get("status") == "ok":
        raise CnnlabError(f"{run.path}: this run already finished; nothing to resume")
    if a.overrides or a.data:
        raise CnnlabError("--resume continues the run as recorded; --set/--data cannot change it (use cnnlab rerun)")
    cfg = load_from_args(run.path / "config.toml", a)
    _check_trusted(cfg, a, run.path)
    if not (run.checkpoints / "last.pt").is_file():
        # nothing to continue from (it stopped before its first checkpoint): the same run from epoch 1, in the
        # same folder, as a suite row does; a stale best.pt of that attempt must not outlive it
        import shutil
        print(f"{run.path}: no checkpoint yet; starting the run over from epoch 1 in the same folder")
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        return _execute(cfg, a, str(run.path / "config.toml"), folder=run)
    print(f"resuming {run.path} from its last checkpoint")
    return _execute(cfg, a, str(run.path / "config.toml"), resume=run)


def cmd_rerun(a) -> int:
    run = run_folder(a.run_dir)
    cfg = load_from_args(run.path / "config.toml", a)
    _check_trusted(cfg, a, run.path)
    return _execute(cfg, a, str(run.path / "config.toml"))


def _check_trusted(cfg: Config, a, run_dir: Path) -> None:
    """A run folder's `package.module:function` model runs only with --trust-code (cnnlab.models.trust)."""
    from cnnlab.models.trust import check_trusted
    check_trusted(cfg.model, a.trust_code, str(run_dir / "config.toml"))
    from cnnlab.models.plugins import import_run_code      # its code, or where it was when the run trained
    from cnnlab.records.io import read_json
    meta = run_dir / "meta.json"
    import_run_code(cfg.model, read_json(meta) if meta.is_file() else {}, str(run_dir))


def cmd_suite(a) -> int:
    from cnnlab.experiments.launch import launcher_from_args
    from cnnlab.experiments.suite import run_suite
    if not a.suite and not a.resume:
        raise CnnlabError("suite: give a suite name or folder, or --resume SUITE_DIR")
    launcher = launcher_from_args(a)
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    overrides = [o for o in overrides_of(a) if o[0] != "seeds"]
    _, failures = run_suite(a.suite, a.runs_dir, overrides, a.data, only, "line" if a.quiet else "bar", a.command,
                            seeds=a.seeds, resume=a.resume, jobs=a.jobs, verbose=a.verbose, launcher=launcher)
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
    from cnnlab.wording import plural
    models = [load(run_folder(d).path, a.weights, a.device, trust_code=a.trust_code) for d in a.run_dir]
    ev, folder, own = evaluate_runs(models, a.data, a.data_dir, a.split, quiet=False)
    unfinished = _unfinished(models)
    if len(models) > 1:
        for m, acc in zip(models, own):
            print(f"  {m.run_dir}: accuracy {acc:.4f}{unfinished.get(m.run_dir, '')}")
    top5 = f"  top-5 {ev.top5:.4f}" if ev.top5 is not None else ""
    what = models[0].config.name if len(models) == 1 else f"ensemble of {len(models)} runs"
    if len(models) == 1:
        what += unfinished.get(models[0].run_dir, "")
    print(f"{what} on {a.data or 'its own data'} ({a.split}, {plural(ev.n, 'image')}): accuracy {ev.top1:.4f}{top5}"
          f"  macro F1 {ev.macro_f1:.4f}  loss {ev.loss:.4f}")
    from cnnlab.records.evaluation import most_confused_pairs
    pairs = most_confused_pairs(ev.confusion, ev.classes, 3)
    if pairs:
        print("most confused: " + "; ".join(f"{p['true']} -> {p['pred']} ({p['rate']:.1%})" for p in pairs))
    print(f"-> {folder}")
    return 0


def _unfinished(models) -> dict:
    """" [unfinished (epoch 2/20): scored checkpoints/last.pt of epoch 2]" for each model of a run that has not
    ended (killed, interrupted, still training): its scores are not the finished run's."""
    from cnnlab.records.runs import RunFolder, run_state
    out = {}
    for m in models:
        state = run_state(RunFolder(m.run_dir))
        if not state.finished:
            of = f" of epoch {m.epoch}" if m.epoch is not None else ""
            out[m.run_dir] = f" [{state.describe()}: scored {m.weights_file}{of}]"
    return out


def cmd_predict(a) -> int:
    from cnnlab.api import load
    from cnnlab.inference.predict import check_predictions_path, format_table, predict_files, write_predictions
    if a.out:
        check_predictions_path(Path(a.out))
    if a.topk < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise CnnlabError("--topk and --batch-size must be >= 1")
    model = load(run_folder(a.run_dir).path, a.weights, a.device, trust_code=a.trust_code)
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
    path, diff = export_run(run_folder(a.run_dir).path, a.format, a.out, a.weights, trust_code=a.trust_code)
    print(f"exported {path} (+ labels.json); max |difference| of probabilities vs PyTorch on real inputs: {diff:.2e}")
    from cnnlab.inference.export import check_tolerance
    check_tolerance(diff)
    return 0


def cmd_models(a) -> int:
    from cnnlab.models import create_model, describe, list_models
    from cnnlab.models.cifar import keras_param_count
    print(f"{'model':<18}{'params (25 classes, Keras count)':>34}  description")
    from cnnlab.models.plugins import ORIGIN
    for name in list_models():
        try:
            n = f"{keras_param_count(create_model(name, 25)):,}"
        except CnnlabError:           # a plugin's net that needs [model.args]: listed, not counted
            n = "?"
        plugin = f" [plugin {ORIGIN[name]['distribution']}]" if name in ORIGIN else ""
        print(f"{name:<18}{n:>34}  {describe(name)}{plugin}")
    print("\nAny timm or torchvision model name (e.g. resnet50) works as a backbone, and package.module:function "
          "as a whole classifier (it takes num_classes) or a backbone ([model] kind).")
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
        code_dirs(a)
        if getattr(a, "func", None):   # commands defined by their own package (p.set_defaults(func=...))
            return a.func(a)
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
