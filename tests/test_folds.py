"""Cross-validation for small data (issue 25.4): `cnnlab run CONFIG --folds K` runs K ordinary runs, each
validating on one stratified K-th of the training split (the seed fixing the parts), and summarizes them as
mean ± std; with seeds and in suites too."""
from __future__ import annotations

import json
import statistics
import tomllib

import numpy as np
import pytest
import torch

from cnnlab.config import from_dict
from cnnlab.errors import DataError
from cnnlab.experiments.holdout import fold_indices, holdout

from conftest import cli, synthetic_row


def labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])[torch.randperm(sum(counts),
                                                                                      generator=torch.Generator().manual_seed(0))]


def test_the_folds_partition_the_training_split_stratified_and_seeded():
    y = labels([30, 60, 90])
    folds = fold_indices(y, 3, seed=0)
    vals = torch.cat([va for _, va in folds])
    assert sorted(vals.tolist()) == list(range(len(y)))                    # each image validates exactly once
    for tr, va in folds:
        assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == len(y)
        assert np.bincount(y[va].numpy()).tolist() == [10, 20, 30]         # stratified: a third of each class
    again, other = fold_indices(y, 3, seed=0), fold_indices(y, 3, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, again))     # the seed fixes the folds
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(folds, other))


def test_a_class_smaller_than_k_is_one_line_with_the_k_that_works():
    with pytest.raises(DataError, match=r"folds = 5: bee has only 3 training images.*use --folds 3 or fewer"):
        fold_indices(labels([10, 3]), 5, seed=0, classes=["ant", "bee"])


def test_holdout_is_fold_i_and_says_which_data_keys_it_replaces():
    y = labels([20, 20])
    cfg = from_dict({"folds": 4, "fold": 2, "data": {"val_fraction": 0.3}})
    tr, va, notes = holdout(y, cfg.data, cfg.seed, cfg.folds, cfg.fold, ["a", "b"])
    assert torch.equal(va, fold_indices(y, 4, cfg.seed)[1][1]) and len(va) == 10
    (note,) = notes
    assert "val_fraction = 0.3 not used" in note and "fold 2" in note
    plain_tr, plain_va, plain_notes = holdout(y, from_dict({"data": {"val_fraction": 0.25}}).data, 0)
    assert len(plain_va) == 10 and plain_notes == []


ROW = synthetic_row("cv", 0.002, 1)


def test_run_folds_k_runs_k_ordinary_runs_and_summarizes_them(tmp_path):
    (tmp_path / "cv.toml").write_text(ROW)
    r = cli(["run", tmp_path / "cv.toml", "--folds", "3", "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert r.returncode == 0, r.stderr
    (parent,) = (tmp_path / "runs").iterdir()
    assert parent.name.startswith("cv-folds-")
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["fold-1", "fold-2", "fold-3"]
    results = [json.loads((parent / f"fold-{i}" / "results.json").read_text()) for i in (1, 2, 3)]
    configs = [tomllib.loads((parent / f"fold-{i}" / "config.toml").read_text()) for i in (1, 2, 3)]
    assert [(c["folds"], c["fold"]) for c in configs] == [(3, 1), (3, 2), (3, 3)]     # a fold reruns alone
    assert all(res["status"] == "ok" for res in results)
    summary = json.loads((parent / "folds.json").read_text())
    val = [res["val_accuracy"] for res in results]
    assert summary["val_accuracy"]["mean"] == pytest.approx(statistics.mean(val))
    assert summary["val_accuracy"]["std"] == pytest.approx(statistics.stdev(val))
    assert summary["test_accuracy"]["mean"] == pytest.approx(statistics.mean(res["test_accuracy"] for res in results))
    # each fold validated on its own third of the 400 training images
    splits = [json.loads((parent / f"fold-{i}" / "meta.json").read_text())["splits"] for i in (1, 2, 3)]
    assert sorted(s["val"] for s in splits) == [133, 133, 134] and all(s["train"] + s["val"] == 400 for s in splits)
    line = next(x for x in r.stdout.splitlines() if x.startswith("== cv over 3 folds"))
    assert f"validation accuracy {summary['val_accuracy']['mean']:.4f} ± {summary['val_accuracy']['std']:.4f}" in line
    assert "test accuracy" in line
    assert "mean ± std (n=3)" in (parent / "folds.md").read_text()


def test_folds_times_seeds_and_a_suite_row_over_its_folds_is_one_report_row(tmp_path):
    from cnnlab.records.report import build_report
    (tmp_path / "cv.toml").write_text(ROW)
    r = cli(["run", tmp_path / "cv.toml", "--folds", "2", "--seeds", "2", "--runs-dir", tmp_path / "runs"],
            tmp_path / "home")
    assert r.returncode == 0, r.stderr
    (parent,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == \
        ["seed0-fold-1", "seed0-fold-2", "seed1-fold-1", "seed1-fold-2"]
    assert "over 2 folds x 2 seeds" in r.stdout
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "01_cv.toml").write_text(ROW.replace('name = "cv"', 'name = "cv"\nfolds = 2'))
    (suite / "02_plain.toml").write_text(synthetic_row("plain", 0.002, 1))
    r = cli(["suite", suite, "--runs-dir", tmp_path / "suite-runs"], tmp_path / "home")
    assert r.returncode == 0, r.stderr
    rows = [x for x in build_report(next((tmp_path / "suite-runs").iterdir())).splitlines()
            if x.startswith("| ") and not x.startswith("| experiment")]
    assert len(rows) == 2 and sum("(n=2)" in x for x in rows) == 1          # the two folds: one row, mean ± std
