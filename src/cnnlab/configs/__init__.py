"""Packaged configs: the practice's suites (one TOML per row) and data presets."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from cnnlab.errors import ConfigError

ROOT = Path(str(resources.files("cnnlab") / "configs"))


def suites() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in ("data", "__pycache__"))


def suite_files(name_or_dir: str) -> list[Path]:
    """A packaged suite name (e.g. 'practice') or a folder of TOML files; rows run in file-name order."""
    folder = Path(name_or_dir)
    if not folder.is_dir():
        folder = ROOT / name_or_dir
    if not folder.is_dir():
        raise ConfigError(f"suite {name_or_dir!r}: no such folder and no packaged suite of that name "
                          f"(packaged: {', '.join(suites())})")
    files = sorted(p for p in folder.glob("*.toml") if not p.name.startswith("_"))
    if not files:
        raise ConfigError(f"suite {name_or_dir!r}: {folder} holds no .toml configs")
    return files


def config_file(name_or_path: str) -> Path:
    """A config path, or a packaged config name such as 'best' or 'practice/01_sgd20'."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (ROOT / name_or_path, ROOT / f"{name_or_path}.toml"):
        if cand.is_file():
            return cand
    matches = sorted(ROOT.glob(f"*/*{name_or_path}.toml"))
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"{name_or_path}: config file not found (nor a packaged config; `cnnlab configs` lists them)")


def data_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = ROOT / "data" / f"{name_or_path}.toml"
    if cand.is_file():
        return cand
    presets = ", ".join(sorted(q.stem for q in (ROOT / "data").glob("*.toml")))
    raise ConfigError(f"--data {name_or_path}: not a file nor a packaged data preset ({presets})")


def all_configs() -> list[str]:
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.rglob("*.toml")
                  if p.parent.name != "data" and not p.name.startswith("_"))
