"""Suites on a Slurm cluster: `cnnlab suite NAME --launcher slurm` runs every row x seed as one task of one
Slurm job array, submitted through submitit; `--launcher local` (the default) is the in-process or `--jobs`
process pool of cnnlab.experiments.suite.

Each task runs the function a local suite runs for a row (suite._run_row) into the same row folder, so
the suite folder must be on a file system the compute nodes share with the submitting machine (submitit's
logs and pickles go to SUITE/slurm/). The submitting process waits, prints one line per change (a row
finished, tasks started), then builds the report from the folder exactly as a local suite does.

Watching the job. submitit learns a task's state only through `sacct`, which needs Slurm's accounting
database (slurmdbd); without one every status call fails with a warning and a task that died without
writing its result (killed, out of memory, node failure) would be waited for forever. So this module never
asks submitit for a state: a task is done when its result file exists (what submitit itself checks first),
running or pending while `squeue` lists it, and lost when it has left the queue without a result for
LOST_AFTER_S seconds (the file system's latency): that row is recorded as failed with its log path.

Time limits. The row task is a submitit Checkpointable: when Slurm signals a time-out or preemption,
submitit requeues the task (up to 3 times) and the row continues from its last finished epoch, as
`cnnlab suite --resume` would.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.errors import CnnlabError

POLL_S = 1.0          # how often result files are looked for (a stat per pending task)
SQUEUE_MAX_S = 30.0   # squeue is asked at 2, 4, 8, ... s after submission, then at most this far apart
LOST_AFTER_S = 15.0   # a task gone from squeue with no result file for this long has died (submitit waits 15 s too)
DEFAULT_TIME_MIN = 60
SIGNAL_DELAY_S = 90   # submitit's --signal=USR2@90: the task checkpoints and requeues itself this long before its limit
MIN_TIME_MIN = 3      # a shorter limit is all warning (Slurm may signal up to 60 s before the asked time)


@dataclass
class SlurmOptions:
    """What each array task asks Slurm for (the --slurm-* options)."""
    partition: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    cpus: int | None = None             # None: the partition's default (usually 1)
    gpus: int = 0
    mem_gb: float | None = None
    setup: list[str] = field(default_factory=list)      # shell lines run before each task (module load, venv)
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option: account, qos, constraint

    def parameters(self, name: str) -> dict:
        """Keyword arguments of submitit's AutoExecutor.update_parameters: the shared names where submitit has
        one (so the local executor understands them too), slurm_* for the rest."""
        p = {"name": name, "timeout_min": self.time_min, "nodes": 1, "tasks_per_node": 1}
        if self.gpus:                 # not --gpus-per-node=0: a cluster without GPU resources may refuse even that
            p["gpus_per_node"] = self.gpus
        if self.cpus is not None:
            p["cpus_per_task"] = self.cpus
        if self.mem_gb is not None:
            p["mem_gb"] = self.mem_gb
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.setup:
            p["slurm_setup"] = list(self.setup)
        if self.extra:
            p["slurm_additional_parameters"] = dict(self.extra)
        return p


# ---------------------------------------------------------------- command line

def add_launcher_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher", "where the rows run (README: On a cluster (Slurm))")
    g.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: this machine (default); slurm: one Slurm job array, one task per row x seed")
    g.add_argument("--slurm-partition", metavar="NAME", help="partition of the tasks (default: the cluster's default)")
    g.add_argument("--slurm-time", type=int, metavar="MIN", default=DEFAULT_TIME_MIN,
                   help=f"time limit of each task in minutes (default {DEFAULT_TIME_MIN}); a task that reaches it is "
                        "requeued and continues from its last epoch")
    g.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per task (default: the partition's); the task "
                                                                "trains with at most N threads")
    g.add_argument("--slurm-gpus", type=int, metavar="N", default=0, help="GPUs per task (default 0)")
    g.add_argument("--slurm-mem", type=float, metavar="GB", help="memory per task in GB (default: the partition's)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each task, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=myproject or qos=short (repeatable)")


def launcher_from_args(a: argparse.Namespace) -> "SlurmLauncher | None":
    """The Slurm launcher the options ask for; None for --launcher local (where --slurm-* options are an error:
    they would silently do nothing)."""
    given = [f"--slurm-{k}" for k, v in (("partition", a.slurm_partition), ("cpus", a.slurm_cpus), ("mem", a.slurm_mem),
                                         ("setup", a.slurm_setup), ("extra", a.slurm_extra)) if v not in (None, [])]
    given += ["--slurm-time"] * (a.slurm_time != DEFAULT_TIME_MIN) + ["--slurm-gpus"] * (a.slurm_gpus != 0)
    if a.launcher == "local":
        if given:
            raise CnnlabError(f"{', '.join(given)}: only used with --launcher slurm")
        return None
    for opt, v in (("--slurm-cpus", a.slurm_cpus), ("--slurm-mem", a.slurm_mem)):
        if v is not None and v <= 0:
            raise CnnlabError(f"{opt} {v}: must be a positive number")
    if a.slurm_time < MIN_TIME_MIN:     # the warning would come at once: requeued again and again, never run
        raise CnnlabError(f"--slurm-time {a.slurm_time}: must be at least {MIN_TIME_MIN} minutes (Slurm warns a task "
                          f"{SIGNAL_DELAY_S} s before its limit, up to 60 s early, to checkpoint and requeue it)")
    if a.slurm_gpus < 0:
        raise CnnlabError(f"--slurm-gpus {a.slurm_gpus}: must be 0 or more")
    extra = {}
    for item in a.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().lstrip("-"):
            raise CnnlabError(f"--slurm-extra {item!r}: write KEY=VALUE, e.g. --slurm-extra account=myproject")
        extra[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return SlurmLauncher(SlurmOptions(a.slurm_partition, a.slurm_time, a.slurm_cpus, a.slurm_gpus, a.slurm_mem,
                                      list(a.slurm_setup), extra))


# ---------------------------------------------------------------- submitting and watching

def make_executor(folder: Path, opts: SlurmOptions, name: str, cluster: str = "slurm"):
    """submitit's AutoExecutor for `folder` with `opts` (cluster='local' only in unit tests)."""
    import submitit
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise CnnlabError("--launcher slurm: no Slurm commands here (sbatch/srun not on PATH); run cnnlab on a "
                          "machine that submits to your cluster (a login node), or use --launcher local")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    try:
        executor.update_parameters(**opts.parameters(name))
    except (ValueError, NameError) as e:           # submitit's message names the bad parameter and the valid ones
        raise CnnlabError(f"--slurm-extra: submitit refuses it: {str(e).splitlines()[0]}") from None
    return executor


def submit_array(executor, fn, items: list) -> tuple[list, str]:
    """executor.map_array(fn, items) as one Slurm job array: (its jobs, the array's job id). A submission
    sbatch refuses (partition, account, limits) is one CnnlabError with everything sbatch said."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    try:
        # submitit prints a refused sbatch's stderr itself; it is in the error below, said once
        with contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.map_array(fn, items)
    except (FailedJobError, FailedSubmissionError) as e:
        said = [line.strip().removeprefix("sbatch: ").removeprefix("error: ") for line in str(e).splitlines()
                if line.strip()]
        raise CnnlabError(f"--launcher slurm: sbatch refused the job: {'; '.join(said) or e} (check the "
                          f"--slurm-* options against your cluster: sinfo lists its partitions)") from None
    return jobs, jobs[0].job_id.split("_")[0]


def logs_pattern(jobs: list) -> str:
    """Where the tasks' logs are: one job's own path, or the array's with <task> for the task number."""
    out = str(jobs[0].paths.stdout)
    return out if len(jobs) == 1 else out.replace(f"_{jobs[0].job_id.split('_')[-1]}_0_log", "_<task>_0_log")


class SlurmLauncher:
    """Runs a suite's rows as one Slurm job array (run_suite's `launcher`)."""

    def __init__(self, opts: SlurmOptions):
        self.opts = opts

    def check(self, jobs: int, distributed: bool) -> None:
        if jobs > 1:
            raise CnnlabError("--jobs is for --launcher local; on Slurm every row is its own task and the cluster "
                              "runs as many at once as it has room for: drop --jobs")
        if distributed:
            raise CnnlabError("--launcher slurm submits the rows as jobs; run it as one process, not under torchrun")

    def run(self, work: list, folder: Path, argv) -> int:
        """Submit the unfinished rows of `work` [(config, source file, row folder)] and wait for them; returns the
        number of rows that did not finish ok."""
        from cnnlab.experiments.suite import _record_failure, _outcome
        from cnnlab.records.runs import RunFolder
        folder = Path(folder).resolve()         # the tasks may start in another directory
        todo = []
        for cfg, source, path in work:
            if Path(path).is_dir() and (RunFolder(path).read_results() or {}).get("status") == "ok":
                print(f"== {cfg.name} (seed {cfg.seed}): finished earlier, skipped")   # --resume: no task for it
            else:
                todo.append((cfg, Path(source).resolve(), Path(path).resolve()))
        if not todo:
            return 0
        executor = make_executor(folder / "slurm", self.opts, f"cnnlab-{folder.name}")
        jobs, array_id = submit_array(executor, RowTask(argv), todo)
        print(f"slurm: submitted job {array_id}, {len(jobs)} task{'s' * (len(jobs) > 1)} "
              f"(logs: {logs_pattern(jobs)})", flush=True)
        failures = 0
        try:
            for (cfg, _, path), job, outcome in _watch(list(zip(todo, jobs)), array_id):
                if outcome is True:
                    print(f"== {cfg.name} (seed {cfg.seed}): {_outcome(path)}  [task {job.job_id}]", flush=True)
                    continue
                failures += 1
                logs = f"logs: {job.paths.stdout} and {job.paths.stderr}"
                if outcome is False:            # the row failed and recorded why (as in a local suite)
                    reason = (RunFolder(path).read_results() or {}).get("reason", "see its log")
                else:                           # the task itself failed: record it in the row's folder
                    reason = f"Slurm task {job.job_id} {outcome}; {logs}"
                    _record_failure(RunFolder(path), cfg, reason, quiet=True)
                where = f"task {job.job_id}" + ("" if logs in reason else f", {logs}")
                print(f"!! {cfg.name} (seed {cfg.seed}): FAILED: {reason}  [{where}]", flush=True)
        except KeyboardInterrupt:
            print(f"\ncnnlab: stopped waiting; Slurm job {array_id} keeps running (scancel {array_id} stops it). "
                  f"When it has ended, `cnnlab report {folder}` builds the report.", flush=True)
            raise
        return failures


class RowTask:
    """The function each array task runs: one row into its folder (suite._run_row, as a local suite runs it).

    On a time-out or preemption submitit calls checkpoint(): the task is requeued with the same arguments, and
    _run_row continues the row from its last checkpoint."""

    def __init__(self, argv):
        self.argv = argv

    def __call__(self, item) -> bool:
        import torch
        from cnnlab.experiments.plan import DataCache
        from cnnlab.experiments.suite import _run_row
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():         # at most the CPUs Slurm gave the task, also where it does not bind them
            torch.set_num_threads(max(1, min(int(cpus), torch.get_num_threads())))
        cfg, source, path = item
        return _run_row(cfg, source, path, "line", DataCache(), self.argv, True)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# Reasons a task pends that mean it can never start as asked (Slurm's squeue REASON codes): the job is cancelled
# and the run ends with one line, rather than waiting forever.
NEVER = {"PartitionConfig": "the tasks ask for more CPUs, memory or GPUs than the partition's nodes have "
                            "(--slurm-cpus, --slurm-mem, --slurm-gpus)",
         "PartitionTimeLimit": "--slurm-time is over the partition's time limit",
         "PartitionNodeLimit": "the tasks ask for more nodes than the partition allows",
         "BadConstraints": "the resources or constraints asked for (--slurm-extra) can never be met",
         "InvalidAccount": "the account (--slurm-extra account=...) is not valid here",
         "InvalidQOS": "the QOS (--slurm-extra qos=...) is not valid here"}


def _squeue(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{'<array>_<task>': (state, reason)} of the tasks Slurm still lists; None when squeue itself failed."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T %r"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # a job Slurm has already forgotten is "Invalid job id specified": nothing of it is queued any more
        return {} if "Invalid job id" in out.stderr else None
    tasks = {}
    for line in out.stdout.splitlines():
        task, state, reason = (line.split(None, 2) + ["", ""])[:3]
        if state:
            tasks[task] = (state, reason.strip())
    return tasks


def _watch(submitted: list, array_id: str):
    """Yield (item, job, outcome) as each task of `submitted` [(item, job)] ends: outcome True/False is the row's
    own result, a string says how the task failed. Prints one status line whenever the counts change."""
    start = time.time()
    pending = {job.job_id: job for _, job in submitted}
    items = {job.job_id: item for item, job in submitted}
    gone_since: dict[str, float] = {}
    next_squeue, queued, q, last_line = start + 2, {}, None, None   # q None: squeue not asked yet, or it failed
    asked = None                       # when squeue last answered
    never_seen = 0                     # squeue calls in a row that said a task can never start
    while pending:
        now = time.time()
        if now >= next_squeue:
            q = _squeue(array_id)
            if q is not None:
                queued, asked = q, now
                for job_id in pending:     # a task is gone from the time the first answer did not list it
                    if job_id in queued:
                        gone_since.pop(job_id, None)
                    else:
                        gone_since.setdefault(job_id, now)
            next_squeue = now + min(SQUEUE_MAX_S, max(2.0, (now - start) / 2))
            if gone_since:             # ask again once a gone task could count as lost, not up to 30 s later
                next_squeue = min(next_squeue, max(now + POLL_S, min(gone_since.values()) + LOST_AFTER_S + POLL_S))
            states = [queued.get(j, ("", ""))[0] for j in pending]
            running, waiting = states.count("RUNNING"), sum(s in ("PENDING", "REQUEUED", "CONFIGURING") for s in states)
            line = f"slurm job {array_id}: {running} running, {waiting} pending, {len(submitted) - len(pending)} done"
            if line != last_line:
                print(line, flush=True)
                last_line = line
            never = [r for j in pending for s, r in [queued.get(j, ("", ""))] if s == "PENDING" and r in NEVER]
            never_seen = never_seen + 1 if never and q is not None else 0
            if never_seen >= 2:        # twice: not a reason of the moment the job was submitted
                subprocess.run(["scancel", array_id], capture_output=True, timeout=60)
                raise CnnlabError(f"--launcher slurm: Slurm will never start job {array_id} ({never[0]}: "
                                  f"{NEVER[never[0]]}); cancelled it (`scontrol show partition` lists the limits)")
        for job_id, job in list(pending.items()):
            outcome = None
            if job.paths.result_pickle.exists():
                outcome = _result(job)
            elif job_id in gone_since and asked - gone_since[job_id] > LOST_AFTER_S:
                # lost only when squeue, asked more than LOST_AFTER_S after it first missed the task, still misses
                # it: a requeued task leaves the list for a moment, and a result file can lag on a shared disk
                state = _accounted_state(job_id)
                if state:
                    outcome = f"ended {state} without a result"
                elif job.paths.stdout.exists():
                    outcome = "left the queue without a result (killed, out of memory or out of time?)"
                else:
                    outcome = "left the queue before it started (cancelled?)"
            if outcome is not None:
                del pending[job_id]
                yield items[job_id], job, outcome
        time.sleep(POLL_S)


def _accounted_state(job_id: str) -> str | None:
    """How Slurm's accounting says the task ended (TIMEOUT, OUT_OF_MEMORY, NODE_FAIL...); None without accounting."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    states = out.stdout.split()
    return states[-1] if out.returncode == 0 and states else None


def _result(job) -> bool | str:
    """The row's outcome from a finished task's result file, or how the task failed (its last error line)."""
    try:
        return bool(job.result())
    except Exception as e:  # noqa: BLE001 - submitit re-raises the task's error (FailedJobError with its traceback)
        last = [line for line in str(e).strip().splitlines() if line.strip()]
        return f"raised {last[-1].strip() if last else type(e).__name__}"
