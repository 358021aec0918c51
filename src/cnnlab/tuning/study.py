"""A study: its folder, its Optuna storage, and the workers that run its trials.

    STUDY/                      runs/<name>-tune-<stamp>/
      study.json                what the study is (storage, metric, pruner, trials wanted), then its summary
      config.toml               the base config with its [tune] table: what every worker trains
      study.db                  the Optuna storage (SQLite) unless --storage names another
      trials/NNNN/              one run folder per trial (by Optuna trial number; pruned ones say so)
      trials.csv, history.png, importance.png, best.toml      (tuning/outputs.py)

The storage is the study: every worker, in this process, in `--jobs` processes or on other machines, runs
`work()` against it, Optuna's documented way to parallelize. A killed worker leaves its trial RUNNING; the
next worker on the same host finds that its process is gone and marks it FAIL (any storage), a trial of a
Slurm task that has left the queue is failed from any host, and RDB storages also keep Optuna's heartbeat, so
a worker dead on another machine is failed after the grace period.
Trials are counted, not numbered: a study wants N finished (complete or pruned) trials, and `work` stops
there; a trial started beyond N by a race between workers is marked FAIL (user attr `surplus`) before it
trains, so the total is exact.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cnnlab.errors import CnnlabError
from cnnlab.records.io import read_json, write_json

STUDY_FILE = "study.json"
CONFIG_FILE = "config.toml"
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S = 60              # Optuna's documented example: heartbeat_interval=60, grace_period=120


def storage_url(url: str | None, study_dir: Path, journal: bool = False) -> str:
    """The storage a study lives in: --storage URL, else a file in the study folder: SQLite, or with `journal`
    (workers on a cluster) a journal file, which Optuna recommends on a shared (NFS) file system."""
    if not url:
        if journal:
            return f"journal://{(study_dir / 'study.log').resolve()}"
        return f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if "://" not in url and url.endswith(".log"):
        return f"journal://{Path(url).resolve()}"
    return url


def open_storage(url: str, heartbeat: int = HEARTBEAT_S):
    """An Optuna storage object for a URL: journal://PATH (a journal file, fine on NFS), or any SQLAlchemy URL
    (sqlite:///..., postgresql://user@host/db, mysql://...) as an RDBStorage with Optuna's heartbeat."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    if url.startswith("journal://"):
        path = Path(url[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    # several processes on one SQLite file wait for its lock instead of failing at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():          # the heartbeat is marked experimental; cnnlab relies on it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    except (ImportError, ModuleNotFoundError) as e:
        raise CnnlabError(f"--storage {_shown(url)}: its database driver is not installed ({e}); for PostgreSQL: "
                          f"pip install 'cnnlab[postgres]'") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy's many error types: one line naming the storage
        if isinstance(e, optuna.exceptions.OptunaError) or type(e).__module__.startswith("sqlalchemy"):
            raise CnnlabError(f"--storage {_shown(url)}: cannot open it ({str(e).splitlines()[0][:300]})") from None
        raise


def _shown(url: str) -> str:
    """A storage URL without its password, for messages and study.json."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True) if "://" in url and "@" in url else url
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: shown as given
        return url


def make_pruner(name: str):
    import optuna
    if name == "median":       # Optuna's defaults: 5 trials before pruning, compared step by step
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def read_spec(study_dir: str | Path) -> dict:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise CnnlabError(f"{study_dir}: not a study folder (no {STUDY_FILE}); start one with cnnlab tune CONFIG")
    return read_json(path)


def create(study_dir: Path, config_doc: dict, *, trials: int, storage: str | None, metric: str, pruner: str,
           seed: int, journal: bool = False, argv=None) -> dict:
    """Write a new study folder (config.toml, study.json) and create the study in its storage."""
    import tomli_w
    from cnnlab.records.io import atomic_write
    (study_dir / "trials").mkdir(parents=True, exist_ok=True)
    with atomic_write(study_dir / CONFIG_FILE, "wb") as f:
        f.write(b"# the base config of this study, with its [tune] search space (cnnlab tune --resume reads it)\n")
        tomli_w.dump(config_doc, f)
    url = storage_url(storage, study_dir, journal)
    spec = {"study_name": study_dir.name, "storage": _shown(url), "metric": metric, "direction": METRICS[metric],
            "pruner": pruner, "trials": trials, "seed": seed, "sampler": "TPESampler",
            "command": list(argv or [])}
    load(spec, url, create=True)
    write_json(study_dir / STUDY_FILE, spec)
    return spec


def load(spec: dict, url: str, create: bool = False, heartbeat: int = HEARTBEAT_S, pruner=None):
    """The study in its storage (created when `create`), with the study's pruner."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)     # cnnlab prints its own line per trial (and error)
    storage = open_storage(url, heartbeat)
    pruner = pruner if pruner is not None else make_pruner(spec["pruner"])
    if create:
        return optuna.create_study(study_name=spec["study_name"], storage=storage, load_if_exists=True,
                                   direction=spec["direction"], pruner=pruner)
    try:
        return optuna.load_study(study_name=spec["study_name"], storage=storage, pruner=pruner)
    except KeyError:
        raise CnnlabError(f"the storage {_shown(url)} holds no study {spec['study_name']!r}; give the --storage "
                          f"it was started with") from None


def resolve_url(spec: dict, study_dir: Path, given: str | None) -> str:
    """The storage URL to use: --storage when given, else the one study.json records (never a password)."""
    if given:
        return storage_url(given, study_dir)
    if "***" in spec["storage"]:
        raise CnnlabError(f"{study_dir}: the study's storage URL has a password, which is not kept in {STUDY_FILE}; "
                          f"give it again: --storage URL")
    return spec["storage"]


# ---------------------------------------------------------------- counting trials, dead workers

def _states(*names):
    from optuna.trial import TrialState
    return tuple(getattr(TrialState, n) for n in names)


def counts(study) -> dict:
    """How many trials are in each state ({"COMPLETE": 3, "PRUNED": 1, ...})."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished(study) -> int:
    return len(study.get_trials(deepcopy=False, states=_states("COMPLETE", "PRUNED")))


def fail_dead_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker process, on this host, no longer exists (killed: SIGKILL,
    out of memory, a closed laptop), whose Slurm task has left the queue, and, on RDB storages, those whose
    heartbeat stopped (any host)."""
    import optuna
    from optuna.trial import TrialState
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)       # heartbeat storages only (RDB); a no-op on a journal
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead(t.user_attrs):
            try:
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass                          # another worker failed it first
    return failed


def _dead(attrs: dict) -> bool:
    """A RUNNING trial's worker is known to be gone: its process on this host, or its Slurm task (a journal
    file has no heartbeat, and a task's trial may have run on another node)."""
    if attrs.get("host") == socket.gethostname() and "pid" in attrs and not _alive(attrs["pid"]):
        return True
    job = attrs.get("slurm_job")
    if not job or (attrs.get("host"), attrs.get("pid")) == (socket.gethostname(), os.getpid()):
        return False
    if job == slurm_job():                  # this task, requeued: its earlier run (and that trial) is over
        return True
    from cnnlab.experiments.launch import _squeue
    queued = _squeue(job)
    return queued is not None and job not in queued          # None: squeue failed, so nothing is known


def slurm_job() -> str | None:
    """This process's Slurm task as squeue names it (<array>_<task>, or the job id), None outside Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Surplus(Exception):
    """A trial started after the study already had its N live trials (two workers asked at once)."""


# ---------------------------------------------------------------- the worker

def work(study_dir: str | Path, storage: str | None = None, n_trials: int | None = None, *, worker: int = 0,
         threads: int = 0, progress: str = "none", callbacks: list = (), pruner=None,
         heartbeat: int = HEARTBEAT_S, argv=None) -> int:
    """Run trials of the study in `study_dir` until it has `n_trials` finished (complete or pruned) trials.

    study_dir: the study folder (study.json, config.toml; trials write their run folders under trials/). It
        must be reachable (a shared filesystem) from every machine that works on the study.
    storage: the storage URL (sqlite:///..., postgresql://..., journal:///path.log); None: the one study.json
        records. Other machines give the same URL.
    n_trials: the total wanted; None: study.json's. Counted over all workers: each stops when it is reached.
    worker: this worker's index (0, 1, ...), mixed into the sampler's seed so that workers started together
        do not draw the same values. threads: CPU threads for this process (0: leave torch's setting).
    progress: "line" prints each epoch, "none" only one line per trial. callbacks: extra training callbacks
        (cnnlab.training.callbacks.Callback) for every trial. pruner: an Optuna pruner object instead of
        study.json's (Python only; every worker of a study should use the same).
    Returns the number of trials this worker finished. A Slurm job (submitit) calls exactly this.
    """
    import optuna
    import torch

    from cnnlab.config import load_config, read_with_base
    from cnnlab.experiments.plan import DataCache
    from cnnlab.tuning.space import parse_space, suggest
    from cnnlab.tuning.trial import run_trial, trial_config
    study_dir = Path(study_dir)
    spec = read_spec(study_dir)
    target = n_trials or spec["trials"]
    if threads:
        torch.set_num_threads(min(threads, torch.get_num_threads()))
    cfg_path = study_dir / CONFIG_FILE
    base = load_config(cfg_path)
    space = parse_space(read_with_base(cfg_path).get("tune"), base, str(cfg_path))
    study = load(spec, resolve_url(spec, study_dir, storage), heartbeat=heartbeat, pruner=pruner)
    cache, done, ran = DataCache(), 0, []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        live = _states("COMPLETE", "PRUNED", "RUNNING")
        before = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        if len(before) >= target:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number}: the study already has its {target} trials")
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if slurm_job():
            trial.set_user_attr("slurm_job", slurm_job())
        values = suggest(trial, space)
        trial.set_user_attr("run", f"trials/{trial.number:04d}")
        cfg = trial_config(base, values, trial.number)
        return run_trial(trial, cfg, study_dir / "trials" / f"{trial.number:04d}", spec["metric"], cache=cache,
                         progress=progress, callbacks=list(callbacks), argv=argv)

    while True:
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state.name in ("COMPLETE", "PRUNED", "RUNNING") for t in trials) >= target:
            return done
        # A fresh seeded TPE per trial, seeded by (seed, trials so far, worker): the same study history gives
        # the same next values (a seeded study repeats; a resumed one does not redraw its first values).
        seed = int(np.random.SeedSequence([spec["seed"], len(trials), worker]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        study.optimize(objective, n_trials=1, catch=(_Surplus,))
        t = next((t for t in study.get_trials(deepcopy=False) if ran and t.number == ran[-1]), None)
        if t is not None and not t.user_attrs.get("surplus"):
            say_trial(t, spec["metric"], target)
            done += t.state.name in ("COMPLETE", "PRUNED")
        ran.clear()


def say_trial(t, metric: str, target: int) -> None:
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    if t.state.name == "COMPLETE":
        what = f"{metric} {t.value:.4f}"
    elif t.state.name == "PRUNED":
        what = f"pruned after epoch {t.last_step}"
    else:
        what = f"{t.state.name} {t.user_attrs.get('reason', '')}".strip()
    print(f"trial {t.number} (of {target}): {what}  {params}", flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- local worker processes (--jobs N)

def run_workers(study_dir: Path, storage: str | None, n_trials: int, jobs: int, heartbeat: int = HEARTBEAT_S,
                argv=None) -> int:
    """`jobs` worker processes on this machine, each with 1/jobs of the cores (as `cnnlab suite --jobs`:
    small nets do more work as several single-threaded processes than as one multi-threaded one); each runs
    `work` against the one storage. Returns how many exited with an error."""
    from cnnlab.runtime.threads import cpu_capacity
    threads = max(1, int(cpu_capacity()) // jobs)
    print(f"tune: {jobs} workers, {threads} thread{'s' * (threads > 1)} each", flush=True)
    ctx = multiprocessing.get_context("spawn")      # not fork: a forked copy of torch's thread pools can deadlock
    procs = [ctx.Process(target=_worker_main, name=f"cnnlab-tune-{i}",
                         args=(str(study_dir), storage, n_trials, i, threads, heartbeat, argv)) for i in range(jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:                   # Ctrl-C reached them too: their trials end as FAIL
            p.join(timeout=30)
        raise
    return sum(p.exitcode != 0 for p in procs)


def _worker_main(study_dir, storage, n_trials, worker, threads, heartbeat, argv) -> None:
    try:
        work(study_dir, storage, n_trials, worker=worker, threads=threads, heartbeat=heartbeat, argv=argv)
    except CnnlabError as e:
        print(f"cnnlab: error: worker {worker}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def wait_for_others(study, timeout_s: float = 0) -> int:
    """RUNNING trials of other workers after ours ended (0: the study is idle); waits up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        fail_dead_trials(study)
        running = len(study.get_trials(deepcopy=False, states=_states("RUNNING")))
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
