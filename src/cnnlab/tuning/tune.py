"""`cnnlab tune` from start to end: check the space, create (or reopen) the study, run the workers, write the
study folder's outputs, and score the chosen configuration on test once the study is complete. The CLI and
`cnnlab.tune` both call `tune`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnlab.config import Config, read_with_base, to_dict
from cnnlab.errors import CnnlabError
from cnnlab.tuning import study as studies


@dataclass
class TuneResult:
    """A study folder after `tune`: its summary (study.json) and where things are."""
    path: Path
    summary: dict

    @property
    def best_config(self) -> Path:
        return self.path / "best.toml"

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


def start(cfg: Config, config_path: Path, runs_dir: str | Path, *, trials: int, storage: str | None = None,
          metric: str = "val_accuracy", pruner: str = "median", journal: bool = False, argv=None) -> Path:
    """A new study folder for `cfg` (loaded from config_path, whose [tune] table is the space); `journal`: the
    default storage is a journal file instead of SQLite (workers on a cluster's shared file system)."""
    from cnnlab.records.runs import RunFolder
    from cnnlab.tuning.space import parse_space
    space_raw = read_with_base(config_path).get("tune")
    parse_space(space_raw, cfg, str(config_path))          # a bad space stops here, before any folder exists
    check_settings(trials, metric, pruner)
    if cfg.seeds > 1 or cfg.folds:
        what = f"seeds = {cfg.seeds}" if cfg.seeds > 1 else f"folds = {cfg.folds}"
        raise CnnlabError(f"{config_path}: {what}: each trial trains one run and chooses on one validation split; "
                          f"tune without it, then train best.toml with --seeds N (or --folds K)")
    if cfg.data.val_fraction == 0:
        raise CnnlabError(f"{config_path}: trials choose on the validation split, but [data] val_fraction = 0 gives "
                          f"none; set it, e.g. --set data.val_fraction=0.1")
    folder = RunFolder.create(runs_dir, f"{cfg.name}-tune").path
    studies.create(folder, {**to_dict(cfg), "tune": space_raw}, trials=trials, storage=storage, metric=metric,
                   pruner=pruner, seed=cfg.seed, journal=journal, argv=argv)
    return folder


def check_settings(trials: int | None, metric: str = "val_accuracy", pruner: str = "median") -> None:
    if trials is not None and trials < 1:
        raise CnnlabError(f"--trials {trials}: give the number of trials the study should finish, 1 or more")
    if metric not in studies.METRICS:
        raise CnnlabError(f"--metric {metric!r}: choose {' or '.join(studies.METRICS)} (trials choose on validation)")
    if pruner not in studies.PRUNERS and not pruner.startswith("python:"):
        raise CnnlabError(f"--pruner {pruner!r}: choose one of {', '.join(studies.PRUNERS)}")


def tune(study_dir: Path, *, trials: int | None = None, storage: str | None = None, jobs: int | None = None,
         progress: str = "line", heartbeat: int = studies.HEARTBEAT_S, pruner=None, callbacks: list = (),
         launcher=None, argv=None) -> TuneResult:
    """Work on the study in `study_dir` until it has `trials` finished trials (None: study.json's), with
    `jobs` local worker processes (None or 1: in this process), or with `launcher` (a
    cnnlab.experiments.launch.SlurmLauncher) `jobs` Slurm tasks (None: one per trial still to run); then
    write its outputs, and score the chosen configuration on test once the study is complete."""
    from cnnlab.records.io import write_json
    from cnnlab.tuning.outputs import write_outputs
    spec = studies.read_spec(study_dir)
    check_settings(trials, spec["metric"], spec["pruner"])
    if spec["pruner"].startswith("python:") and pruner is None:
        raise CnnlabError(f"{study_dir}: the study prunes with a Python pruner object ({spec['pruner'][7:]}); "
                          f"resume it from Python with the same one: cnnlab.tune(resume=..., pruner=...)")
    if jobs is not None and jobs < 1:
        raise CnnlabError(f"--jobs {jobs}: give the number of worker processes, 1 or more")
    if trials and trials != spec["trials"]:               # a resumed study may be asked for more (or fewer)
        spec["trials"] = trials
        write_json(Path(study_dir) / studies.STUDY_FILE, spec)
    target = spec["trials"]
    url = studies.resolve_url(spec, Path(study_dir), storage)
    study = studies.load(spec, url, heartbeat=heartbeat)
    failed = studies.fail_dead_trials(study)
    if failed:
        print(f"tune: trial{'s' * (len(failed) > 1)} {', '.join(map(str, failed))} of a killed worker marked FAIL")
    done = studies.finished(study)
    print(f"tune: {study_dir}: {done} of {target} trials finished; {spec['metric']} ({spec['direction']}), "
          f"TPE sampler (seed {spec['seed']}), {spec['pruner']} pruner", flush=True)
    if launcher is not None and done < target:
        if pruner is not None or callbacks:
            raise CnnlabError("tune: a pruner object or callbacks work in this process only, not in Slurm tasks")
        from cnnlab.tuning.slurm import run_on_slurm
        if run_on_slurm(Path(study_dir), url, target, jobs or target - done, launcher.opts, argv):
            print(f"tune: a Slurm task failed (above); the study is kept: cnnlab tune --resume {study_dir}")
    elif (jobs or 1) > 1 and done < target:
        if pruner is not None or callbacks:
            raise CnnlabError("tune: a pruner object or callbacks work in this process only; use jobs=1")
        if studies.run_workers(Path(study_dir), url, target, jobs, heartbeat, argv):
            raise CnnlabError(f"tune: a worker stopped with an error (above); the study is kept: cnnlab tune "
                              f"--resume {study_dir}")
    elif done < target:
        studies.work(study_dir, url, target, progress=progress, callbacks=callbacks, pruner=pruner,
                     heartbeat=heartbeat, argv=argv)
    running = studies.wait_for_others(study)
    complete = studies.finished(study) >= target and not running
    summary = write_outputs(study, Path(study_dir), score_test=complete)
    say(summary, Path(study_dir), running)
    return TuneResult(Path(study_dir), summary)


def say(summary: dict, study_dir: Path, running: int) -> None:
    c = summary["counts"]
    print(f"tune: {c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
          + (f", {running} still running elsewhere" if running else ""))
    best = summary.get("best")
    if best:
        params = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        print(f"best: trial {best['trial']}  {summary['metric']} {best['value']:.4f}  {params}")
    test = summary.get("test")
    if test:
        print(f"test (scored once, for trial {test['trial']}): accuracy {test['accuracy']:.4f}  loss {test['loss']:.4f}")
    elif not summary.get("complete"):
        print(f"the study is not complete: the test split is scored when it is (cnnlab tune --resume {study_dir})")
    if best:
        print(f"-> {study_dir}   (train the chosen config: cnnlab run {study_dir / 'best.toml'})")
