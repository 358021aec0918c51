"""The [tune] table: a search space over the config's own keys, as Optuna distributions.

    [tune]
    "train.lr" = { loguniform = [1e-4, 1e-1] }
    "train.batch_size" = { choice = [32, 64, 128] }
    "early_stopping.patience" = { int = [1, 10] }
    "augment.zoom" = { uniform = [0.0, 0.3] }

Each key is a config key as `--set` writes it; each value names one distribution. The space is checked
against the config before any trial runs: the key must exist, the distribution must give values of the key's
type, the range must not be empty, and both ends (every choice) must pass the config's own checks, so a
typo or an impossible range is one clear line instead of a failed trial an hour later.
"""
from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass

from cnnlab.config import SECTIONS, Config, _type_ok, apply_overrides
from cnnlab.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "choice")
EXAMPLE = '"train.lr" = { loguniform = [1e-4, 1e-1] }'
# keys a trial must not change: the run's identity, and the validation split every trial is compared on
FIXED = {"name", "seeds", "folds", "fold", "data.val_fraction", "data.val_split"}


@dataclass(frozen=True)
class Param:
    key: str                # a config key, e.g. "train.lr"; also the Optuna parameter name
    kind: str               # one of KINDS
    values: tuple           # (low, high), or the choices

    def suggest(self, trial):
        """This parameter's value for an Optuna trial (trial.suggest_*: the sampler decides)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")

    def describe(self) -> str:
        return f"{self.key} {self.kind} {list(self.values)}"


def parse_space(raw, base: Config, where: str) -> list[Param]:
    """The [tune] table `raw` checked against the config `base`; ConfigError naming the key otherwise."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: no [tune] table to search; add one, e.g. [tune] {EXAMPLE}")
    return [_param(key, spec, base, f"{where}: [tune] '{key}'") for key, spec in raw.items()]


def suggest(trial, space: list[Param]) -> list[tuple[str, typing.Any]]:
    """The trial's values as typed overrides [("train.lr", 0.003), ...], for config.apply_overrides."""
    return [(p.key, p.suggest(trial)) for p in space]


def _param(key: str, spec, base: Config, w: str) -> Param:
    tp = _key_type(key, w)
    if key in FIXED:
        raise ConfigError(f"{w}: cannot be tuned (every trial keeps the config's {key}: trials are compared on "
                          f"one validation split, under one name)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{w}: must be a table with one of {', '.join(KINDS)}, e.g. {EXAMPLE}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{w}: choice must list the values to try, e.g. choice = [32, 64, 128]; got {values!r}")
        if any(isinstance(v, (list, dict)) for v in values) or len(set(map(repr, values))) < len(values):
            raise ConfigError(f"{w}: choice must list distinct single values (numbers, strings, true/false); "
                              f"got {values!r}")
    else:
        _check_range(kind, values, tp, key, w)
    for v in values:                     # both ends (every choice) must be a value the config accepts
        _accepts(base, key, v, w)
    return Param(key, kind, tuple(float(v) if kind in ("loguniform", "uniform") else v for v in values))


def _key_type(key: str, w: str):
    section, _, sub = key.rpartition(".")
    if section and section not in SECTIONS:
        raise ConfigError(f"{w}: unknown section '{section}' (known: {', '.join(SECTIONS)}); keys are written as "
                          f"--set writes them, e.g. {EXAMPLE}")
    hints = typing.get_type_hints(SECTIONS[section] if section else Config)
    if sub not in hints or (not section and sub in SECTIONS):
        known = ", ".join(sorted(k for k in hints if section or k not in SECTIONS))
        raise ConfigError(f"{w}: not a config key{f' of [{section}]' if section else ''} (known: {known})")
    return hints[sub]


def _check_range(kind: str, values, tp, key: str, w: str) -> None:
    numbers = isinstance(values, list) and len(values) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not numbers:
        raise ConfigError(f"{w}: {kind} must be [low, high], two numbers; got {values!r}")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{w}: int must be [low, high], two integers; got {values!r}")
    if not low < high:
        raise ConfigError(f"{w}: the range {values} is empty: {kind} = [low, high] needs low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{w}: loguniform needs low > 0 (it draws log(value) uniformly); got {values!r}")
    if kind == "int" and not _type_ok(1, tp):
        raise ConfigError(f"{w}: int draws integers, but {key} is not an integer key; use choice = [...]")
    if kind != "int" and not _type_ok(1.5, tp):
        hint = "int = [low, high] or choice = [...]" if _type_ok(1, tp) else "choice = [...]"
        raise ConfigError(f"{w}: {kind} draws real numbers, but {key} takes {_what(tp)}; use {hint}")


def _accepts(base: Config, key: str, value, w: str) -> None:
    """`value` set on a copy of the config passes the config's own type and range checks."""
    cfg = copy.deepcopy(base)
    try:
        apply_overrides(cfg, [(key, value)])
        cfg.check("config")
    except ConfigError as e:
        raise ConfigError(f"{w}: the value {value!r} is not allowed ({str(e).replace('--set ', '')})") from None


def _what(tp) -> str:
    from cnnlab.config import _type_name
    return _type_name(tp) + ("s" if _type_name(tp) in ("integer", "string") else "")
