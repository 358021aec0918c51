"""Runs that are never lost: resume after SIGKILL with identical metrics, suites that survive a failing
row and resume, checkpoint identity errors, unique run folders, rerun, seeds statistics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cnnlab.records.report import compare_test
from cnnlab.records.runs import RunFolder
from cnnlab.records.io import load_checkpoint

from conftest import LineReader, ROOT, cli, run_cli, subprocess_env, synthetic_row, wait_for_checkpoint

CFG = """
name = "res"
seed = 3
[data]
source = "synthetic"
classes = 10
synthetic_train = 1500
synthetic_test = 300
[model]
name = "deepnet_bn_pre"
[train]
optimizer = "adam"
epochs = {epochs}
batch_size = 32
normalize = "featurewise"
precision = "fp32"
[augment]
zoom = 0.2
hflip = true
[early_stopping]
enabled = true
monitor = "val_loss"
patience = 20
restore_best_weights = true
"""


def _write(tmp_path: Path, epochs: int = 5) -> Path:
    p = tmp_path / "res.toml"
    p.write_text(CFG.format(epochs=epochs))
    return p


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "history.json").read_text())]


def test_resume_after_sigkill_gives_identical_metrics(tmp_path):
    cfg = _write(tmp_path)
    full = cli(["run", cfg, "--runs-dir", tmp_path / "full", "-q"], tmp_path / "home")
    assert full.returncode == 0, full.stderr
    full_run = next((tmp_path / "full").iterdir())

    # Start the same run, SIGKILL it once its 2nd epoch checkpoint exists, then resume.
    env = subprocess_env(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "run", str(cfg), "--runs-dir", str(tmp_path / "killed"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    out = LineReader(proc.stdout)
    try:
        wait_for_checkpoint(tmp_path / "killed", 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    seen = out.seen
    killed_run = next((tmp_path / "killed").iterdir())
    assert not (killed_run / "results.json").exists(), seen
    epoch_at_kill = load_checkpoint(killed_run / "checkpoints" / "last.pt")["epoch"]
    assert 2 <= epoch_at_kill < 5
    resumed = cli(["run", "--resume", killed_run, "-q"], tmp_path / "home")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    assert _history(killed_run) == _history(full_run)
    a = json.loads((full_run / "results.json").read_text())
    b = json.loads((killed_run / "results.json").read_text())
    for k in ("test_accuracy", "test_loss", "best_epoch", "epochs_run"):
        assert a[k] == b[k], k


def test_ctrl_c_says_how_to_resume(tmp_path):
    cfg = _write(tmp_path, epochs=50)
    env = subprocess_env(tmp_path / "home")
    # A test runner started in the background may have SIGINT ignored, and children inherit that: give the
    # child the default disposition, as an interactive terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "run", str(cfg), "--runs-dir", str(tmp_path / "runs"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    LineReader(proc.stdout).wait_for("epoch 1/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "cnnlab run --resume" in err and "Traceback" not in err


def test_resume_refuses_finished_run_and_folder_without_checkpoint(tmp_path):
    cfg = _write(tmp_path, epochs=1)
    assert cli(["run", cfg, "--runs-dir", tmp_path / "runs", "-q"], tmp_path / "home").returncode == 0
    run = next((tmp_path / "runs").iterdir())
    proc = cli(["run", "--resume", run], tmp_path / "home")
    assert proc.returncode == 2 and "already finished" in proc.stderr
    proc = cli(["run", "--resume", tmp_path], tmp_path / "home")
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_checkpoint_of_another_config_names_both(tmp_path):
    cfg = _write(tmp_path, epochs=1)
    assert cli(["run", cfg, "--runs-dir", tmp_path / "a", "-q"], tmp_path / "home").returncode == 0
    assert cli(["run", cfg, "--runs-dir", tmp_path / "b", "-q", "--set", "name='other'",
                    "--set", "model.name='basenet'"], tmp_path / "home").returncode == 0
    a, b = next((tmp_path / "a").iterdir()), next((tmp_path / "b").iterdir())
    (a / "results.json").unlink()                               # pretend 'a' was killed...
    (a / "checkpoints" / "last.pt").write_bytes((b / "checkpoints" / "last.pt").read_bytes())   # ...with b's file
    proc = cli(["run", "--resume", a], tmp_path / "home")
    assert proc.returncode == 2
    assert "'other'" in proc.stderr and "'res'" in proc.stderr and "basenet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from cnnlab.errors import CheckpointError
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(bad)


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint holding an arbitrary object (code on load) is refused by weights_only loading."""
    from cnnlab.errors import CheckpointError
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": RunFolder(tmp_path)}, evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)


def test_a_signal_during_a_checkpoint_write_is_handled_once_it_is_written(tmp_path, monkeypatch):
    """Slurm's warning signal (submitit's handler requeues, then sys.exit) or Ctrl-C arriving inside torch.save
    must not leave torch's zip writer half-way (its own RuntimeError then replaced the exit, and a requeued task
    reported itself failed): the handler runs after the write, and the checkpoint on disk is whole."""
    from cnnlab.records.io import save_checkpoint
    real_save, calls = torch.save, []

    def save_interrupted(obj, f, *args, **kwargs):     # the signal comes while the checkpoint is being written
        signal.raise_signal(signal.SIGUSR2)
        calls.append("saved")
        return real_save(obj, f, *args, **kwargs)

    def requeue_and_exit(signum, frame):
        calls.append("handler")
        raise SystemExit(-1)

    monkeypatch.setattr(torch, "save", save_interrupted)
    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        with pytest.raises(SystemExit):
            save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.arange(5.0)}, "epoch": 3})
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == ["saved", "handler"]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 3 and state["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert signal.getsignal(signal.SIGUSR2) is previous and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_run_folders_never_collide(tmp_path):
    made = []

    def make():
        made.append(RunFolder.create(tmp_path, "same").path)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


def _suite(tmp_path: Path) -> Path:
    d = tmp_path / "suite"
    d.mkdir()
    (d / "01_a.toml").write_text(synthetic_row("a", 0.001, 2))
    (d / "02_boom.toml").write_text(synthetic_row("boom", 1e9, 2))   # diverges
    (d / "03_c.toml").write_text(synthetic_row("c", 0.003, 2).replace('"synthetic"', '"imagefolder"'))
    (d / "04_d.toml").write_text(synthetic_row("d", 0.002, 2))
    (d / "_suite.toml").write_text('[[compare]]\na = "a"\nb = "d"\nlabel = "lr 0.001 vs 0.002"\n')
    return d


def test_suite_survives_failing_rows_and_resumes(tmp_path):
    d = _suite(tmp_path)
    proc = cli(["suite", d, "--runs-dir", tmp_path / "runs", "--seeds", "2", "-q"], tmp_path / "home")
    assert proc.returncode == 1, proc.stderr                          # something failed...
    folder = next((tmp_path / "runs").iterdir())
    results = {p.parent.name: json.loads(p.read_text()) for p in folder.rglob("results.json")}
    assert {r["status"] for k, r in results.items() if "-a-" in k or "-d-" in k} == {"ok"}   # ...the others ran
    assert {r["status"] for k, r in results.items() if "boom" in k} == {"diverged"}
    assert {r["status"] for k, r in results.items() if "-c-" in k} == {"failed"}
    assert "data_dir" in next(r for k, r in results.items() if "-c-" in k)["reason"]
    report = (folder / "report.md").read_text()
    assert "## Rows that did not finish" in report and "boom" in report
    assert "lr 0.001 vs 0.002" in report and "paired t-test, 2 seeds" in report

    # Resume: finished rows are skipped (their results untouched), failed ones are tried again.
    before = {k: (folder / "rows" / k / "results.json").stat().st_mtime_ns for k in results if "-a-" in k}
    proc = cli(["suite", "--resume", folder, "-q"], tmp_path / "home")
    assert proc.returncode == 1
    assert proc.stdout.count("finished earlier, skipped") == 4           # a and d, two seeds each
    after = {k: (folder / "rows" / k / "results.json").stat().st_mtime_ns for k in before}
    assert before == after


def test_suite_resume_continues_an_interrupted_row(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "01_x.toml").write_text(CFG.format(epochs=4).replace('name = "res"', 'name = "x"'))
    env = subprocess_env(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "suite", str(d), "--runs-dir", str(tmp_path / "runs"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    LineReader(proc.stdout)
    try:
        ckpt = wait_for_checkpoint(tmp_path / "runs", 2)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    folder = next((tmp_path / "runs").iterdir())
    done = load_checkpoint(ckpt)["epoch"]
    before = json.loads((ckpt.parent.parent / "history.json").read_text())[:done]
    proc = cli(["suite", "--resume", folder, "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    # A resumed row prints only the epochs it still had to train, and keeps the finished epochs' records
    # (their wall-clock seconds too, which a restarted row could not reproduce).
    assert f"resuming from epoch {done}" in proc.stdout, proc.stdout
    printed = [int(line.split()[1].split("/")[0]) for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert printed == list(range(done + 1, 5)), proc.stdout
    hist = json.loads(next(folder.rglob("history.json")).read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[:done] == before


def test_rerun_repeats_the_recorded_config(tmp_path):
    cfg = _write(tmp_path, epochs=2)
    assert cli(["run", cfg, "--runs-dir", tmp_path / "runs", "--set", "data.synthetic_train=500", "-q"],
                   tmp_path / "home").returncode == 0
    first = next((tmp_path / "runs").iterdir())
    meta = json.loads((first / "meta.json").read_text())
    for key in ("cnnlab", "torch", "device", "command", "git_commit", "python"):
        assert key in meta
    assert meta["command"][-1] == "-q"
    proc = cli(["rerun", first, "--runs-dir", tmp_path / "again", "-q"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    second = next((tmp_path / "again").iterdir())
    assert _history(first) == _history(second)


def test_compare_test_paired_and_welch():
    a = {0: 0.50, 1: 0.52, 2: 0.51}
    b = {0: 0.60, 1: 0.63, 2: 0.61}
    name, p = compare_test(a, b)
    assert name.startswith("paired") and p < 0.01
    noisy = {0: 0.50, 1: 0.60, 2: 0.40}
    _, p = compare_test(a, noisy)
    assert p > 0.5
    name, _ = compare_test(a, {5: 0.6, 6: 0.61})
    assert name.startswith("Welch")
    assert compare_test({0: 0.5}, b) is None


def test_suite_jobs_runs_rows_side_by_side_with_the_results_of_one_at_a_time(tmp_path):
    d = _suite(tmp_path)
    (d / "04_d.toml").unlink()                  # a, boom (diverges), c (no data): three outcomes, one training
    (d / "_suite.toml").unlink()
    outs = {}
    for jobs in ("1", "2"):
        runs = tmp_path / f"runs{jobs}"
        proc = run_cli(["suite", d, "--runs-dir", runs, "--jobs", jobs, "-q"], tmp_path / "home")
        assert proc.returncode == 1, proc.stderr                      # boom diverges, c has no data
        folder = next(runs.iterdir())
        outs[jobs] = {p.parent.name: (json.loads(p.read_text())["status"], _numbers(p.parent))
                      for p in folder.rglob("results.json")}
        assert (folder / "report.md").is_file()
    assert "2 at a time" in proc.stdout and "[3/3]" in proc.stdout
    assert {k: v[0] for k, v in outs["2"].items()} == {"01-a": "ok", "02-boom": "diverged", "03-c": "failed"}
    assert len(outs["2"]["01-a"][1]) == 4       # two epochs of history, test accuracy and loss
    assert outs["2"] == outs["1"]          # one thread per row either way (OMP_NUM_THREADS=1): same numbers


def killed_model(num_classes: int = 10):
    """A model whose construction kills its own process, as the out-of-memory killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_suite_jobs_records_a_row_whose_process_died_and_runs_the_others(tmp_path):
    d = tmp_path / "suite"
    d.mkdir()
    (d / "01_a.toml").write_text(synthetic_row("a", 0.001, 1))
    (d / "02_killed.toml").write_text(synthetic_row("killed", 0.001, 1).replace('"basenet"', '"test_robust:killed_model"'))
    (d / "03_c.toml").write_text(synthetic_row("c", 0.001, 1))
    proc = run_cli(["suite", d, "--runs-dir", tmp_path / "runs", "--jobs", "2", "-q"], tmp_path / "home",
                   PYTHONPATH=str(ROOT / "tests"))
    assert proc.returncode == 1, proc.stderr
    folder = next((tmp_path / "runs").iterdir())
    status = {p.parent.name: json.loads(p.read_text()) for p in folder.rglob("results.json")}
    assert {k: r["status"] for k, r in status.items()} == {"01-a": "ok", "02-killed": "failed", "03-c": "ok"}
    assert "ended abruptly (exit code -9)" in status["02-killed"]["reason"]
    assert "killed" in (folder / "report.md").read_text()


def test_suite_jobs_must_be_positive(tmp_path, capsys):
    from cnnlab.cli import main
    assert main(["suite", str(_suite(tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--jobs", "0"]) == 2
    assert "--jobs 0" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def _numbers(run: Path) -> list:
    """A row's history and test metrics, without its timings."""
    if not (run / "history.json").is_file():
        return []
    r = json.loads((run / "results.json").read_text())
    return ([{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "history.json").read_text())]
            + [r["test_accuracy"], r["test_loss"]])
