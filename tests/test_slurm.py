"""`cnnlab suite --launcher slurm`: one Slurm job array, one task per row x seed, the same report as a local suite.

The tests marked `slurm` submit to a real Slurm cluster (.ci/run starts a single-node one with .ci/slurm.sh). They
skip when no Slurm node answers, unless CNNLAB_TEST_SLURM=1 (CI), where they must run. The others check the
option -> submitit -> sbatch mapping without a cluster (submitit's local executor, and its sbatch text).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cnnlab.experiments import launch
from conftest import cli, synthetic_row


def _slurm_up() -> str | None:
    """None when a Slurm node is ready for jobs, else why not."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "no Slurm commands (sinfo, sbatch) on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    states = out.stdout.split()
    if out.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states):
        return f"no Slurm node up (sinfo: {(out.stdout + out.stderr).strip()[:200]!r}); start one with .ci/slurm.sh start"
    return None


def _require_slurm():
    reason = _slurm_up()
    if reason and os.environ.get("CNNLAB_TEST_SLURM") == "1":
        pytest.fail(f"CNNLAB_TEST_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def _suite(folder: Path, names: list[str], epochs: int = 1) -> Path:
    folder.mkdir(parents=True)
    for i, n in enumerate(names, 1):
        # one pinned thread: the same numbers wherever the row runs (the tasks share a 2-core node)
        text = synthetic_row(n, 0.001 * i, epochs).replace("synthetic_train = 400", "synthetic_train = 160")
        (folder / f"{i:02d}_{n}.toml").write_text(text.replace("[train]\n", "[train]\nthreads = 1\n"))
    return folder


def _only(runs: Path) -> Path:
    [folder] = [p for p in runs.iterdir() if p.is_dir()]
    return folder


def _table(report: str) -> dict[str, list[str]]:
    """The report's result rows by experiment, without the seconds column (wall time differs run to run)."""
    lines = [l for l in report.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    drop = header.index("seconds")
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("experiment", "---") or set(cells[0]) <= set("-: "):
            continue
        rows[cells[0]] = cells[:drop] + cells[drop + 1:]
    return rows


# ---------------------------------------------------------------- without a cluster

def test_options_map_to_sbatch_lines(tmp_path, monkeypatch):
    """Every --slurm-* option becomes its sbatch line, through submitit's own parameter names."""
    import submitit
    opts = launch.SlurmOptions(partition="gpu", time_min=90, cpus=4, gpus=2, mem_gb=8,
                               setup=["source /shared/venv/bin/activate"], extra={"account": "proj", "qos": "short"})
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))   # no srun needed
    script = launch.make_executor(tmp_path / "slurm", opts, "cnnlab-x")._executor._make_submission_file_text("CMD", "u")
    lines = set(script.splitlines())
    for want in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --mem=8GB", "#SBATCH --account=proj", "#SBATCH --qos=short",
                 "#SBATCH --job-name=cnnlab-x", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "source /shared/venv/bin/activate"):
        assert want in lines, (want, script)
    assert script.index("source /shared/venv/bin/activate") < script.index("srun")
    bare = launch.make_executor(tmp_path / "s2", launch.SlurmOptions(), "n")._executor._make_submission_file_text("C", "u")
    assert "#SBATCH --time=60" in bare and "gpus" not in bare and "partition" not in bare and "cpus-per-task" not in bare

    # submitit's local executor takes the shared parameters (and validates the slurm_* names against Slurm's)
    local = launch.make_executor(tmp_path / "local", opts, "cnnlab-x", cluster="local")
    assert local._executor.parameters["timeout_min"] == 90 and local._executor.parameters["gpus_per_node"] == 2


def test_option_errors(tmp_path):
    suite = _suite(tmp_path / "s", ["a"])
    for args, msg in ((["--slurm-cpus", "2"], "--slurm-cpus: only used with --launcher slurm"),
                      (["--launcher", "slurm", "--slurm-extra", "account"], "write KEY=VALUE"),
                      (["--launcher", "slurm", "--slurm-time", "2"], "--slurm-time 2: must be at least 3 minutes"),
                      (["--launcher", "slurm", "--slurm-cpus", "0"], "--slurm-cpus 0: must be a positive number"),
                      (["--launcher", "slurm", "--jobs", "2"], "--jobs is for --launcher local")):
        proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs", *args], tmp_path / "home")
        assert proc.returncode == 2 and proc.stderr.startswith("cnnlab: error:") and msg in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- on a real Slurm

def test_suite_on_slurm_is_one_array_and_reports_as_a_local_suite(tmp_path):
    _require_slurm()
    suite = _suite(tmp_path / "two", ["slow", "fast"])
    slurm_runs, local_runs = tmp_path / "slurm-runs", tmp_path / "local-runs"
    proc = cli(["suite", suite, "--runs-dir", slurm_runs, "-q", "--launcher", "slurm",
                "--slurm-cpus", "1", "--slurm-time", "5"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 runs ok" in proc.stdout and "slurm: submitted job" in proc.stdout
    folder = _only(slurm_runs)

    # one array job, one task per row (x seed), each on the CPUs it asked for
    metas = {p.name: json.loads((p / "meta.json").read_text())["slurm"] for p in sorted((folder / "rows").iterdir())}
    assert sorted(metas) == ["01-slow", "02-fast"]
    assert len({m["array_job_id"] for m in metas.values()}) == 1
    assert sorted(int(m["array_task_id"]) for m in metas.values()) == [0, 1]
    assert len({m["job_id"] for m in metas.values()}) == 2 and {m["cpus"] for m in metas.values()} == {"1"}
    array = next(iter(metas.values()))["array_job_id"]
    assert f"slurm: submitted job {array}, 2 tasks (logs: {folder / 'slurm'}/{array}_<task>_0_log.out)" in proc.stdout
    script = (folder / "slurm" / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --cpus-per-task=1" in script and "#SBATCH --time=5" in script
    for task in range(2):
        assert "Job completed successfully" in (folder / "slurm" / f"{array}_{task}_0_log.out").read_text()

    # the same suite run here: the same report (same seeds, one thread: the same numbers), bar wall times
    proc = cli(["suite", suite, "--runs-dir", local_runs, "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local = _only(local_runs)
    slurm_table, local_table = (_table((f / "report.md").read_text()) for f in (folder, local))
    assert len(slurm_table) == 2 and slurm_table == local_table
    for row in metas:
        a, b = (json.loads((f / "rows" / row / "results.json").read_text()) for f in (folder, local))
        assert a["status"] == b["status"] == "ok" and a["test_accuracy"] == b["test_accuracy"]
        assert a["test_loss"] == b["test_loss"]

    # --resume: every row finished, so nothing is submitted again
    proc = cli(["suite", "--resume", folder, "--launcher", "slurm", "--slurm-cpus", "1"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("finished earlier, skipped") == 2 and "submitted" not in proc.stdout
    assert len(list((folder / "slurm").glob("*_submission.sh"))) == 1


def test_a_job_sbatch_refuses_is_one_error(tmp_path):
    _require_slurm()
    suite = _suite(tmp_path / "s", ["a"])
    proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs", "--launcher", "slurm", "--slurm-partition", "nosuch"],
               tmp_path / "home")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("cnnlab: error: --launcher slurm: sbatch refused the job") and "partition" in line, line


def test_failed_tasks_are_reported_with_their_logs(tmp_path, monkeypatch):
    """A row that raises fails as in a local suite; a task that dies without a result is recorded as failed."""
    _require_slurm()
    monkeypatch.setattr(launch, "LOST_AFTER_S", 3.0)
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "crashy.py").write_text("import os\n"
                                    "def dies(*a, **k):\n    os._exit(3)\n"
                                    "def raises(*a, **k):\n    raise ValueError('this model cannot be built')\n")
    monkeypatch.setenv("PYTHONPATH", str(mods))          # sbatch passes the environment on to the tasks
    suite = _suite(tmp_path / "bad", ["dies", "raises"])
    for f, model in (("01_dies.toml", "crashy:dies"), ("02_raises.toml", "crashy:raises")):
        (suite / f).write_text((suite / f).read_text().replace('name = "basenet"', f'name = "{model}"'))
    proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs", "-q", "--launcher", "slurm", "--slurm-cpus", "1",
                "--slurm-time", "5"], tmp_path / "home")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0/2 runs ok" in proc.stdout
    folder = _only(tmp_path / "runs")
    lines = {l.split(" ")[1]: l for l in proc.stdout.splitlines() if l.startswith("!! ")}
    assert set(lines) == {"dies", "raises"}, proc.stdout
    for name, task in (("dies", 0), ("raises", 1)):
        [log] = (folder / "slurm").glob(f"*_{task}_0_log.out")
        assert f"logs: {log} and {log.with_suffix('.err')}" in lines[name], lines[name]
    assert "ValueError: this model cannot be built" in lines["raises"]
    assert "left the queue without a result" in lines["dies"]
    dies = json.loads((folder / "rows" / "01-dies" / "results.json").read_text())
    assert dies["status"] == "failed" and "_0_log.out" in dies["reason"]
    raises = json.loads((folder / "rows" / "02-raises" / "results.json").read_text())
    assert raises["status"] == "failed" and "this model cannot be built" in raises["reason"]
    report = (folder / "report.md").read_text()
    assert report.count("failed") >= 2


def test_a_requeued_task_continues_its_row_from_the_last_epoch(tmp_path):
    """Slurm's warning signal (a time limit or preemption) checkpoints and requeues the task; the row resumes
    from its last epoch and ends with exactly the metrics of an uninterrupted run."""
    _require_slurm()
    import threading
    import time
    suite = _suite(tmp_path / "long", ["long"], epochs=60)
    runs = tmp_path / "runs"
    seen: dict = {}

    def interrupt():                    # as Slurm does 90 s before --slurm-time, once the row has an epoch
        deadline = time.time() + 60
        while time.time() < deadline and not list(runs.glob("*/rows/*/checkpoints/last.pt")):
            time.sleep(0.05)
        job = subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"cnnlab-{next(runs.iterdir()).name}"],
                             capture_output=True, text=True).stdout.split()[0]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        while time.time() < deadline:   # requeued jobs wait 2 minutes (BeginTime) before they may start again
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
            if "PENDING" in state:
                seen["pending"] = state.strip()
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                return
            time.sleep(0.1)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    proc = cli(["suite", suite, "--runs-dir", runs, "-q", "--launcher", "slurm", "--slurm-cpus", "1"], tmp_path / "home")
    t.join(timeout=5)
    assert proc.returncode == 0 and "1/1 run ok" in proc.stdout, proc.stdout + proc.stderr
    assert seen.get("pending", "").startswith("PENDING"), seen
    folder = _only(runs)
    [log] = (folder / "slurm").glob("*_0_log.out")
    text = log.read_text()
    assert "Caught signal SIGUSR2" in text and "Requeued job" in text, text
    assert text.count("Starting with JobEnvironment") == 2 and "== long (seed 0): resuming from epoch " in text
    slurm_row = json.loads((folder / "rows" / "01-long" / "results.json").read_text())
    history = json.loads((folder / "rows" / "01-long" / "history.json").read_text())
    assert slurm_row["status"] == "ok" and len(history) == 60

    proc = cli(["suite", suite, "--runs-dir", tmp_path / "local", "-q"], tmp_path / "home")
    local_row = json.loads((_only(tmp_path / "local") / "rows" / "01-long" / "results.json").read_text())
    assert (slurm_row["test_accuracy"], slurm_row["test_loss"]) == (local_row["test_accuracy"], local_row["test_loss"])


def test_a_job_slurm_can_never_start_is_cancelled_with_one_error(tmp_path):
    """sbatch takes a job the partition can never run (pending PartitionConfig): one line and the job cancelled,
    not a wait for ever."""
    _require_slurm()
    suite = _suite(tmp_path / "s", ["a", "b"])
    proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs", "--launcher", "slurm", "--slurm-cpus", "512"],
               tmp_path / "home")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("cnnlab: error: --launcher slurm: Slurm will never start job ") and \
        "PartitionConfig: the tasks ask for more CPUs" in line and "cancelled it" in line, line
    job = line.split("start job ")[1].split()[0]
    queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True).stdout
    assert "PENDING" not in queued and "RUNNING" not in queued, queued


class _Clock:
    """time.time / time.sleep for launch._watch: sleeping moves the clock, nothing waits."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    def sleep(self, s):
        self.now += s


def _scripted_watch(tmp_path, monkeypatch, listed):
    """Run launch._watch on one task whose squeue answers are `listed(t)` (t: seconds since submission);
    returns (outcome, seconds waited)."""
    from types import SimpleNamespace
    clock = _Clock()
    monkeypatch.setattr(launch, "time", clock)
    monkeypatch.setattr(launch, "_accounted_state", lambda job_id: None)
    monkeypatch.setattr(launch, "_squeue", lambda array: {"5_0": ("RUNNING", "None")} if listed(clock.now - 1000) else {})
    (tmp_path / "5_0_log.out").write_text("started\n")
    job = SimpleNamespace(job_id="5_0", paths=SimpleNamespace(result_pickle=tmp_path / "5_0_result.pkl",
                                                             stdout=tmp_path / "5_0_log.out"))
    for _, _, outcome in launch._watch([("row", job)], "5"):
        return outcome, clock.now - 1000
    raise AssertionError("_watch ended without an outcome")


def test_a_task_missing_from_one_squeue_answer_is_not_lost(tmp_path, monkeypatch):
    """A requeued task is briefly not listed (and squeue is asked only every 30 s late in a job): it is lost only
    when squeue, asked LOST_AFTER_S after it first missed the task, still misses it."""
    # listed, except in the first answer after 60 s (a requeue), then listed until the result appears at 200 s
    missed = []

    def listed(t):
        if t >= 200:
            (tmp_path / "5_0_result.pkl").write_bytes(b"")
        if t >= 60 and not missed:
            missed.append(t)
            return False
        return True
    monkeypatch.setattr(launch, "_result", lambda job: True)
    outcome, waited = _scripted_watch(tmp_path, monkeypatch, listed)
    assert missed and outcome is True and waited >= 200, (missed, outcome, waited)


def test_a_task_gone_from_squeue_is_lost_soon_after_lost_after_s(tmp_path, monkeypatch):
    outcome, waited = _scripted_watch(tmp_path, monkeypatch, lambda t: t < 100)
    assert outcome.startswith("left the queue without a result"), outcome
    # first missed at the first answer after 100 s (answers are at most SQUEUE_MAX_S apart), lost one answer later
    assert 100 + launch.LOST_AFTER_S < waited <= 100 + launch.SQUEUE_MAX_S + launch.LOST_AFTER_S + 3, waited
