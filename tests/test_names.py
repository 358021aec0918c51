"""A run or suite name is one folder name: nothing is ever written outside --runs-dir."""
from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from cnnlab.config import from_dict
from cnnlab.errors import ConfigError
from cnnlab.records.runs import RunFolder

from conftest import cli, synthetic_row

BAD = ["../x", "/tmp/abs", "a/b", "a\\b", ".hidden", "", "tab\tname", "..", "new\nline", "x" * 201]


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", BAD)
def test_config_check_refuses_a_name_that_is_not_one_folder_name(name):
    with pytest.raises(ConfigError, match=r"'name'") as e:
        from_dict({"name": name})
    assert repr(name)[:40] in str(e.value) or len(name) > 200


@pytest.mark.parametrize("name", BAD)
def test_run_folder_create_guards_every_caller(tmp_path, name):
    runs = tmp_path / "a" / "runs"
    with pytest.raises(ConfigError, match="one folder inside --runs-dir"):
        RunFolder.create(runs, name)
    assert everything_under(tmp_path) == []                          # not even --runs-dir was made


@pytest.mark.parametrize("name", ["resnet-cub", "08_bnpre", "café", "a b", "x.y"])
def test_ordinary_names_still_work(tmp_path, name):
    assert from_dict({"name": name}).name == name
    folder = RunFolder.create(tmp_path / "runs", name)
    assert folder.path.parent == tmp_path / "runs" and folder.path.name.startswith(f"{name}-")


@pytest.mark.parametrize("name", ["../../escape", "{tmp}/ABS"])
def test_cnnlab_run_with_an_escaping_name_writes_nothing(tmp_path, name):
    name = name.format(tmp=tmp_path)              # an absolute name, inside this test's folder
    cfg = tmp_path / "work" / "c.toml"
    cfg.parent.mkdir()
    cfg.write_text(synthetic_row("ok", 0.001, 1).replace('name = "ok"', f"name = {tomli_w.dumps({'n': name})[4:]}"))
    proc = cli(["run", cfg, "--runs-dir", tmp_path / "work" / "runs"], tmp_path / "home")
    assert proc.returncode == 2
    assert "'name'" in proc.stderr and repr(name) in proc.stderr and "Traceback" not in proc.stderr
    assert everything_under(tmp_path / "work") == ["c.toml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]      # no ABS-<time>, no escape-<time>


def test_a_suite_folder_named_with_a_leading_dot_is_refused(tmp_path):
    suite = tmp_path / ".hidden"
    suite.mkdir()
    (suite / "01_a.toml").write_text(synthetic_row("a", 0.001, 1))
    proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2 and "'.hidden'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_suite_path_ending_in_dotdot_is_named_after_the_folder_it_means(tmp_path, monkeypatch):
    from cnnlab.experiments import suite as suite_mod
    (tmp_path / "mysuite" / "sub").mkdir(parents=True)
    made = []
    monkeypatch.setattr(suite_mod.RunFolder, "create", classmethod(lambda cls, d, n: made.append(n) or 1 / 0))
    monkeypatch.setattr(suite_mod, "load_rows", lambda *a: ([], []))
    monkeypatch.setattr(suite_mod, "check_data", lambda *a: None)
    with pytest.raises(ZeroDivisionError):
        suite_mod.run_suite(str(tmp_path / "mysuite" / "sub" / ".."), tmp_path / "runs", [], seeds=1)
    assert made == ["mysuite"]


def test_a_suite_row_with_a_bad_name_stops_the_suite_before_any_row(tmp_path):
    suite = tmp_path / "s"
    suite.mkdir()
    (suite / "01_a.toml").write_text(synthetic_row("a", 0.001, 1))
    (suite / "02_b.toml").write_text(synthetic_row("../b", 0.001, 1))
    proc = cli(["suite", suite, "--runs-dir", tmp_path / "runs"], tmp_path / "home")
    assert proc.returncode == 2 and "'../b'" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "b").exists()
