"""`cnnlab tune`: an Optuna study over a config's [tune] table, choosing on validation only.

Tiny synthetic configs (BaseNet, 1-2 epochs, one thread): each trial trains in about a second. The study must
survive a SIGKILL (resume completes it with the right count), two worker processes must never run the same
trial, the test split is scored once (for the chosen trial), a pruned trial is recorded as pruned, and a bad
space is one line and exit 2. The PostgreSQL test starts a throwaway server (skips without one, unless
CNNLAB_TEST_PG=1); the Slurm test submits to the real cluster as tests/test_slurm.py does.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import cli, subprocess_env, synthetic_row, wait_for_checkpoint

SPACE = """
[tune]
"train.lr" = { loguniform = [1e-4, 3e-2] }
"train.batch_size" = { choice = [16, 32] }
"""


def _config(tmp_path: Path, epochs: int = 1, space: str = SPACE, name: str = "tiny") -> Path:
    text = synthetic_row(name, 0.001, epochs).replace("synthetic_train = 400", "synthetic_train = 200")
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("[train]\n", "[train]\nthreads = 1\n") + space)
    return path


def _study(runs: Path) -> Path:
    [folder] = [p for p in runs.iterdir() if p.is_dir()]
    return folder


def _trials(study: Path) -> list[dict]:
    with open(study / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def _states(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


def _optuna_trials(study: Path, url: str | None = None):
    from cnnlab.tuning import study as studies
    spec = studies.read_spec(study)
    return studies.load(spec, url or spec["storage"]).get_trials(deepcopy=False)


# ---------------------------------------------------------------- the study folder, the one test score

def test_tune_chooses_on_validation_and_scores_test_once(tmp_path, monkeypatch):
    """3 trials: trials.csv, the figures, best.toml (which `cnnlab run` trains), and exactly one test scoring:
    for the best trial, not in any trial, and not again when the complete study is resumed."""
    import cnnlab.records.evaluation as evaluation
    scored = []
    real = evaluation.evaluate_logits
    monkeypatch.setattr(evaluation, "evaluate_logits", lambda logits, y, classes: scored.append(len(y)) or
                        real(logits, y, classes))
    cfg, runs = _config(tmp_path), tmp_path / "runs"
    proc = cli(["tune", cfg, "--trials", 3, "--runs-dir", runs], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = _study(runs)
    rows = _trials(study)
    assert [r["number"] for r in rows] == ["0", "1", "2"] and _states(rows) == {"COMPLETE": 3}
    assert all(1e-4 <= float(r["train.lr"]) <= 3e-2 and r["train.batch_size"] in ("16", "32") for r in rows)
    assert (study / "history.png").stat().st_size > 1000 and (study / "importance.png").stat().st_size > 1000

    summary = json.loads((study / "study.json").read_text())
    best = max(rows, key=lambda r: float(r["value"]))
    assert summary["best"]["trial"] == int(best["number"]) and summary["complete"] is True
    assert scored == [100], scored                         # the 100 test images, scored once
    assert summary["test"]["trial"] == int(best["number"]) and summary["test"]["n"] == 100
    assert f"test (scored once, for trial {best['number']})" in proc.stdout
    for r in rows:                                          # no trial saw the test split
        meta = json.loads((study / r["run"] / "meta.json").read_text())
        assert meta["splits"]["test"] == 0 and meta["splits"]["val"] == 20, meta["splits"]
        assert (study / r["run"] / "eval-test").is_dir() == (r is best)

    again = cli(["tune", "--resume", study], tmp_path / "home")
    assert again.returncode == 0 and "3 of 3 trials finished" in again.stdout, again.stdout + again.stderr
    assert scored == [100]

    from cnnlab.config import load_config
    chosen = load_config(study / "best.toml")
    assert chosen.train.lr == pytest.approx(float(best["train.lr"])) and chosen.train.batch_size == int(best["train.batch_size"])
    run = cli(["run", study / "best.toml", "--runs-dir", tmp_path / "best-runs", "-q"], tmp_path / "home")
    assert run.returncode == 0, run.stdout + run.stderr
    trained = json.loads((_study(tmp_path / "best-runs") / "results.json").read_text())
    assert trained["status"] == "ok" and trained["val_accuracy"] == pytest.approx(float(best["value"]))



def test_processes_finishing_one_study_at_once_score_test_once(tmp_path, monkeypatch):
    """Two workers that end a study together (`--jobs`, or two `tune --resume` on one storage) both write the
    study's outputs; the test split is still scored once (a lock on the study folder)."""
    import threading
    import time

    import cnnlab.records.evaluation as evaluation
    from cnnlab.tuning import study as studies
    from cnnlab.tuning.outputs import write_outputs
    cfg, runs = _config(tmp_path), tmp_path / "runs"
    proc = cli(["tune", cfg, "--trials", 2, "--runs-dir", runs], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = _study(runs)
    summary = json.loads((folder / "study.json").read_text())
    summary.pop("test")                          # as if the last trial had just ended: not scored yet
    (folder / "study.json").write_text(json.dumps(summary))
    scored = []
    real = evaluation.evaluate_logits

    def slow(logits, y, classes):                # a wide window for the two workers to overlap in
        scored.append(len(y))
        time.sleep(1.0)
        return real(logits, y, classes)
    monkeypatch.setattr(evaluation, "evaluate_logits", slow)
    spec = studies.read_spec(folder)
    out = []
    workers = [threading.Thread(target=lambda: out.append(write_outputs(studies.load(spec, spec["storage"]), folder,
                                                                        score_test=True))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert scored == [100], scored
    assert len(out) == 2 and out[0]["test"] == out[1]["test"] and out[0]["test"]["n"] == 100
    assert json.loads((folder / "study.json").read_text())["test"] == out[0]["test"]

def test_python_api_and_a_pruned_trial_is_recorded_as_pruned(tmp_path):
    """cnnlab.tune with a scripted pruner that prunes trial 1 after its first epoch: Optuna and the run folder
    both record it as pruned, and the study still counts 3 finished trials."""
    import optuna

    import cnnlab

    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.number == 1

    assert {"tune", "lr_find"} <= set(dir(cnnlab))
    result = cnnlab.tune(_config(tmp_path, epochs=2), trials=3, runs_dir=tmp_path / "runs", pruner=PruneTrialOne())
    assert result.complete and result.best_config.is_file()
    rows = _trials(result.path)
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE"] and rows[1]["last_epoch"] == "1"
    pruned = json.loads((result.path / "trials/0001/results.json").read_text())
    assert pruned["status"] == "pruned" and pruned["epochs_run"] == 1 and "pruned" in pruned["reason"]
    assert json.loads((result.path / "trials/0000/results.json").read_text())["epochs_run"] == 2
    assert result.summary["best"]["trial"] in (0, 2) and result.summary["counts"] == {"COMPLETE": 2, "PRUNED": 1}
    # its pruner lives in this process only: the command line cannot resume it without one
    proc = cli(["tune", "--resume", result.path, "--trials", 4], tmp_path / "home")
    assert proc.returncode == 2 and "Python pruner object (PruneTrialOne)" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- killed, resumed; two workers

def test_a_killed_study_resumes_to_the_right_count(tmp_path):
    """SIGKILL the tune process in its second trial; --resume marks that trial FAIL and completes the study with
    exactly 3 finished trials."""
    cfg, runs, home = _config(tmp_path, epochs=8), tmp_path / "runs", tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "tune", str(cfg), "--trials", "3", "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=home,
                            env=subprocess_env(home))
    try:
        wait_for_checkpoint(runs, 1, timeout=120)          # runs/<study> appears with the first trial
        wait_for_checkpoint(_study(runs) / "trials" / "0001", 1, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]               # reaped: its pid is gone, as after a shell's kill -9
    study = _study(runs)
    assert "trial 0 (of 3)" in out and "trial 1 (of 3)" not in out, out
    proc = cli(["tune", "--resume", study], home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trial 1 of a killed worker marked FAIL" in proc.stdout and "1 of 3 trials finished" in proc.stdout
    rows = _trials(study)
    assert _states(rows) == {"COMPLETE": 3, "FAIL": 1} and rows[1]["state"] == "FAIL", rows
    assert [r["number"] for r in rows if r["state"] == "COMPLETE"] == ["0", "2", "3"]
    assert json.loads((study / "study.json").read_text())["test"]["trial"] in (0, 2, 3)


def test_two_worker_processes_never_run_the_same_trial(tmp_path):
    """--jobs 2 on a journal-file storage: 4 trials, each run by one process into its own folder, both
    processes working, and no trial beyond the 4."""
    cfg, runs = _config(tmp_path, epochs=3), tmp_path / "runs"       # trials long enough for both to get some
    log = tmp_path / "shared" / "study.log"
    proc = cli(["tune", cfg, "--trials", 4, "--jobs", 2, "--storage", log, "--runs-dir", runs], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tune: 2 workers, 1 thread each" in proc.stdout and log.stat().st_size > 0
    study = _study(runs)
    assert json.loads((study / "study.json").read_text())["storage"] == f"journal://{log.resolve()}"
    trials = _optuna_trials(study)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs.get("surplus") for t in trials if t not in done)
    assert len({t.user_attrs["pid"] for t in done}) == 2                   # both processes worked
    for t in done:                                    # each folder trained its own trial's values, once
        meta = json.loads((study / t.user_attrs["run"] / "meta.json").read_text())
        from cnnlab.config import load_config
        ran = load_config(study / t.user_attrs["run"] / "config.toml")
        assert ran.train.lr == pytest.approx(t.params["train.lr"]) and ran.train.batch_size == t.params["train.batch_size"]
        assert meta["splits"]["test"] == 0
    assert sorted(p.name for p in (study / "trials").iterdir()) == sorted(t.user_attrs["run"][7:] for t in done)


# ---------------------------------------------------------------- PostgreSQL

@pytest.fixture
def postgres():
    """A throwaway PostgreSQL 15 server on a Unix socket (run as `nobody`: initdb refuses root); its URL."""
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    want = os.environ.get("CNNLAB_TEST_PG") == "1"

    def unavailable(why: str):
        (pytest.fail if want else pytest.skip)(f"no PostgreSQL server: {why}")

    try:
        import psycopg2  # noqa: F401  (the postgres extra)
    except ImportError:
        unavailable("psycopg2 is not installed (pip install 'cnnlab[postgres]')")
    if not (bin_dir / "initdb").is_file():
        unavailable(f"{bin_dir}/initdb not found")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        unavailable("running as root without runuser")
    root = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
    root.chmod(0o777)
    port = 54000 + os.getpid() % 1000
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True, timeout=120, cwd="/")
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                        "-o", f"-k {root} -p {port} -c listen_addresses=''", "start"],
                       check=True, capture_output=True, timeout=120, cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(str(e))
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120, cwd="/")
        shutil.rmtree(root, ignore_errors=True)


def test_a_study_in_postgresql(tmp_path, postgres):
    cfg, runs = _config(tmp_path), tmp_path / "runs"
    proc = cli(["tune", cfg, "--trials", 2, "--storage", postgres, "--runs-dir", runs], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = _study(runs)
    assert not (study / "study.db").exists()
    assert [t.state.name for t in _optuna_trials(study, postgres)] == ["COMPLETE", "COMPLETE"]
    more = cli(["tune", "--resume", study, "--trials", 3], tmp_path / "home")     # the URL study.json keeps
    assert more.returncode == 0 and "2 of 3 trials finished" in more.stdout, more.stdout + more.stderr
    assert [t.number for t in _optuna_trials(study, postgres)] == [0, 1, 2]


# ---------------------------------------------------------------- bad spaces and options: one line, exit 2

@pytest.mark.parametrize("space, message", [
    ('"train.lrr" = { uniform = [0.1, 0.2] }', "[tune] 'train.lrr': not a config key of [train]"),
    ('"trian.lr" = { uniform = [0.1, 0.2] }', "[tune] 'trian.lr': unknown section 'trian'"),
    ('"train.lr" = { loguniform = [0.1, 0.01] }', "the range [0.1, 0.01] is empty"),
    ('"train.lr" = { uniform = [0.1] }', "uniform must be [low, high], two numbers"),
    ('"train.lr" = { loguniform = [0, 0.1] }', "loguniform needs low > 0"),
    ('"train.lr" = { normal = [0, 1] }', "must be a table with one of loguniform, uniform, int, choice"),
    ('"train.batch_size" = { uniform = [16.0, 64.0] }', "train.batch_size takes integers; use int = [low, high]"),
    ('"train.batch_size" = { choice = ["a", "b"] }', "the value 'a' is not allowed"),
    ('"train.batch_size" = { choice = [] }', "choice must list the values to try"),
    ('"train.optimizer" = { choice = ["adam", "adamm"] }', "the value 'adamm' is not allowed"),
    ('"train.lr" = { uniform = [-1.0, 0.1] }', "the value -1.0 is not allowed"),
    ('"seeds" = { int = [1, 3] }', "'seeds': cannot be tuned"),
    ('', "no [tune] table to search"),
])
def test_a_bad_space_is_one_line_and_exit_2(tmp_path, space, message):
    cfg = _config(tmp_path, space=f"[tune]\n{space}\n" if space else "")
    proc = cli(["tune", cfg, "--trials", 2, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("cnnlab: error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()                 # checked before any study folder exists


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials 0: give the number of trials"),
    ([], "give --trials N"),
    (["--trials", "2", "--metric", "accuracy"], "--metric 'accuracy': choose val_accuracy or val_loss"),
    (["--trials", "2", "--pruner", "early"], "--pruner 'early': choose one of median, hyperband, none"),
    (["--trials", "2", "--jobs", "0"], "--jobs 0: give the number of worker processes"),
    (["--trials", "2", "--slurm-cpus", "2"], "--slurm-cpus: only used with --launcher slurm"),
    (["--trials", "2", "--seeds", "3"], "seeds = 3: each trial trains one run"),
    (["--trials", "2", "--set", "data.val_fraction=0"], "trials choose on the validation split"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    proc = cli(["tune", _config(tmp_path), "--runs-dir", tmp_path / "runs", *args], tmp_path / "home")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_resume_errors(tmp_path):
    home = tmp_path / "home"
    for args, message in ((["--resume", tmp_path], "not a study folder (no study.json)"),
                          (["--resume", tmp_path, "--set", "train.lr=0.1"], "--set cannot change a study"),
                          (["tune.toml", "--resume", tmp_path], "not both")):
        proc = cli(["tune", *args], home)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            (args, proc.stderr)


# ---------------------------------------------------------------- on a real Slurm

def test_tune_on_slurm_runs_the_workers_as_one_array(tmp_path):
    """2 tiny trials by 2 worker tasks of one sbatch array, on a journal file in the study folder; the test
    split is scored once, here, after the tasks."""
    from test_slurm import _require_slurm
    _require_slurm()
    cfg, runs = _config(tmp_path), tmp_path / "runs"
    proc = cli(["tune", cfg, "--trials", 2, "--runs-dir", runs, "--launcher", "slurm", "--slurm-cpus", "1",
                "--slurm-time", "5"], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slurm: submitted job" in proc.stdout and "2 worker tasks" in proc.stdout, proc.stdout
    study = _study(runs)
    assert (study / "study.log").stat().st_size > 0 and not (study / "study.db").exists()
    trials = [t for t in _optuna_trials(study) if t.state.name == "COMPLETE"]
    assert len(trials) == 2 and _states(_trials(study)).get("COMPLETE") == 2
    assert len(list((study / "slurm").glob("*_log.out"))) == 2
    assert json.loads((study / "study.json").read_text())["test"]["n"] == 100


def test_a_trial_of_a_vanished_slurm_task_is_failed_from_any_host(tmp_path, monkeypatch):
    """A journal file has no heartbeat: a RUNNING trial of another node is failed when its Slurm task has left
    the queue (or is this very task, requeued), and kept while squeue lists it or cannot be asked."""
    import optuna

    from cnnlab.experiments import launch
    from cnnlab.tuning import study as studies
    study = optuna.create_study(storage=studies.open_storage(f"journal://{tmp_path / 's.log'}"))
    for job in ("7_0", "7_1", "8_0", "9_0"):
        t = study.ask()
        t.set_user_attr("host", "node-elsewhere")
        t.set_user_attr("pid", 12345)
        t.set_user_attr("slurm_job", job)
    monkeypatch.setattr(launch, "_squeue", lambda job: None if job == "9_0" else {"7_1": "RUNNING"} if job == "7_1" else {})
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert studies.fail_dead_trials(study) == [0, 2]        # 7_0 gone; 8_0 is this task, requeued
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "RUNNING", "FAIL", "RUNNING"]
