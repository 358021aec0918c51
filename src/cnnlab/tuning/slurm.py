"""`cnnlab tune --launcher slurm`: the study's workers as the tasks of one Slurm job array (through submitit).

Every task runs `study.work` against the study's storage, exactly as a `--jobs` process does on this
machine, so the study folder and the storage must be reachable from the compute nodes (a shared file system;
the default storage of such a study is a journal file, STUDY/study.log, as Optuna recommends on NFS). The
submitting process waits for the tasks (cnnlab.experiments.launch watches them without sacct), then writes
the study's outputs and scores the chosen configuration on test, once, here.

A task that reaches its time limit is requeued by submitit (Checkpointable): the trial it was training is
left RUNNING, and the requeued task marks it FAIL (each trial records its task, user attr slurm_job); a trial
whose task has left the queue is failed by any worker or `cnnlab tune --resume`, on any host.
"""
from __future__ import annotations

import os
from pathlib import Path

from cnnlab.errors import CnnlabError


class TuneTask:
    """What each array task runs: one study worker (its index seeds its sampler apart from the others)."""

    def __init__(self, study_dir: str, url: str, target: int, argv):
        self.study_dir, self.url, self.target, self.argv = study_dir, url, target, argv

    def __call__(self, worker: int) -> int:
        from cnnlab.tuning.study import work
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        threads = int(cpus) if cpus and cpus.isdigit() else 0     # at most the CPUs Slurm gave the task
        return work(self.study_dir, self.url, self.target, worker=worker, threads=threads, argv=self.argv)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def run_on_slurm(study_dir: Path, url: str, target: int, tasks: int, opts, argv) -> int:
    """Submit `tasks` workers of the study as one job array with the --slurm-* options `opts` and wait for
    them; returns how many tasks failed."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from cnnlab.experiments.launch import _watch, make_executor
    study_dir = Path(study_dir).resolve()          # the tasks may start in another directory
    if url.startswith("sqlite:"):
        print("tune: note: the study's storage is SQLite; Optuna advises against it for workers on several "
              "machines (use --storage FILE.log, a journal file, or PostgreSQL)", flush=True)
    executor = make_executor(study_dir / "slurm", opts, f"cnnlab-tune-{study_dir.name}")
    try:
        jobs = executor.map_array(TuneTask(str(study_dir), url, target, argv), list(range(tasks)))
    except (FailedJobError, FailedSubmissionError) as e:     # sbatch said no: a partition, account, limit
        said = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CnnlabError(f"--launcher slurm: sbatch refused the job: {said[-1] if said else e} (check the "
                          f"--slurm-* options against your cluster: sinfo lists its partitions)") from None
    array_id = jobs[0].job_id.split("_")[0]
    print(f"slurm: submitted job {array_id}, {tasks} worker task{'s' * (tasks > 1)} "
          f"(logs: {study_dir / 'slurm'}/{array_id}_<task>_0_log.out)", flush=True)
    failures = 0
    try:
        for worker, job, outcome in _watch([(i, job) for i, job in enumerate(jobs)], array_id):
            if outcome is True:                       # work() returned: True only if it finished a trial
                print(f"slurm: worker {worker} [task {job.job_id}] done", flush=True)
            elif outcome is False:
                print(f"slurm: worker {worker} [task {job.job_id}] done, no trial left for it", flush=True)
            else:
                failures += 1
                print(f"!! slurm: worker {worker} [task {job.job_id}] {outcome}; logs: {job.paths.stdout} and "
                      f"{job.paths.stderr}", flush=True)
    except KeyboardInterrupt:
        print(f"\ncnnlab: stopped waiting; Slurm job {array_id} keeps working on the study (scancel {array_id} "
              f"stops it). Afterwards `cnnlab tune --resume {study_dir}` writes its outputs.", flush=True)
        raise
    return failures
