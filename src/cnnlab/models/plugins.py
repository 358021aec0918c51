"""Models from outside cnnlab: installed plugins, modules a config names, and what a run folder records of them.

Three ways in, so that `cnnlab run`, `predict`, `evaluate` and `rerun` (each its own process) find the same nets:

  - an installed plugin: a distribution declares an entry point in the `cnnlab.models` group, as pytest's
    and timm-style registries are extended:
        [project.entry-points."cnnlab.models"]
        mynets = "mynets"              # a module, imported for its @register_model functions
        convbn = "mynets:convbn"       # or one function, registered under the entry point's name
    They load once per process, the first time the registry is asked (`cnnlab models` lists them);
  - `[model] module = "mynets"`: a module imported before [model] name is looked up;
  - `[model] name = "mynets:convbn"`: one function (models/backbones.py, models/build.py).

A run records where its model's code came from (meta.json "model_code": module, file, plugin distribution), and
a net registered from an importable module of the user's is written into its config.toml as `[model] module`, so a
later process imports it (with --trust-code: models/trust.py). When that code is missing there, the error says
where it was when the run trained and how to make it importable.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cnnlab.config import ModelConfig
from cnnlab.errors import CnnlabError, ConfigError

if TYPE_CHECKING:
    import torch

GROUP = "cnnlab.models"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_loaded = False
FAILED: dict[str, str] = {}      # entry point ("name = value") -> why it did not load
ORIGIN: dict[str, dict] = {}     # model name -> the plugin that registered it (distribution, version, entry point)


def load_entry_points(registry: dict, register: Callable[[str, Callable], None]) -> None:
    """Import every `cnnlab.models` entry point once per process. A plugin that fails to import is one warning
    (cnnlab's own nets and the other plugins still work); asking for one of its models names the failure."""
    global _loaded
    if _loaded:
        return
    _loaded = True          # first: a plugin that asks the registry while it is imported does not recurse
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else "?"
        before = set(registry)
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a plugin's import is its own code: any failure is one line
            FAILED[f"{ep.name} = {ep.value}"] = f"{dist}: {type(e).__name__}: {first_line(e)}"
            warnings.warn(f"cnnlab: the model plugin {ep.name} = {ep.value!r} (distribution {dist}) did not load: "
                          f"{type(e).__name__}: {first_line(e)}; its models are not available", stacklevel=2)
            continue
        if not inspect.ismodule(obj) and callable(obj) and ep.name not in registry:
            register(ep.name, obj)
        for name in set(registry) - before:
            ORIGIN[name] = {"distribution": dist, "version": ep.dist.version if ep.dist else "",
                            "entry_point": f"{ep.name} = {ep.value}"}


def failures_hint() -> str:
    """' (plugins that did not load: ...)' for the 'not a registered model' error; '' when all loaded."""
    return f" (model plugins that did not load: {'; '.join(f'{k} ({v})' for k, v in FAILED.items())})" if FAILED else ""


def import_module(name: str, where: str = "[model] module"):
    """The module `name`, imported; one ConfigError saying why not (not found, or its own code failed)."""
    if not _MODULE.fullmatch(name):
        raise ConfigError(f"{where} = {name!r} is not a module name (a dotted path such as 'mynets' or 'pkg.nets')")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):          # the module itself (or its package) is not on the path
            raise ConfigError(f"{where} = {name!r}: no module named {e.name!r} on the Python path; run from its "
                              f"folder, add the folder to PYTHONPATH, or pip install its package") from None
        raise ConfigError(f"{where} = {name!r}: importing it failed: {type(e).__name__}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the user's module: any failure is one line naming it
        raise ConfigError(f"{where} = {name!r}: importing it failed: {type(e).__name__}: {first_line(e)}") from None


def load_function(spec: str) -> Callable:
    """The function a `package.module:function` entry names (imported, not called)."""
    from cnnlab.models.trust import parse_entry
    mod_name, fn_name = parse_entry(spec)
    module = import_module(mod_name, f"[model] name = {spec!r}: module")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"[model] name = {spec!r}: module {mod_name} ({_file_of(module)}) has no function "
                          f"{fn_name!r}")
    return fn


def parameters(fn: Callable) -> set[str]:
    """The named parameters of `fn` (empty when Python cannot say, e.g. for a builtin)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _missing(module: str) -> bool:
    """Whether `module` (or a package above it) is not on the Python path."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _root(module: str, file: str) -> str:
    """The folder that makes `module` importable, from the file it was: /x for pkg.nets at /x/pkg/nets.py."""
    up = module.count(".") + 1 + (Path(file).name == "__init__.py")
    return str(Path(file).parents[up - 1]) if len(Path(file).parents) >= up else str(Path(file).parent)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters: what a one-line error quotes of it."""
    return (str(e).splitlines() or [""])[0][:300]


def call_user_function(fn: Callable, kwargs: dict, where: str, weights: str) -> "torch.nn.Module":
    """fn(**kwargs), the user's own code, as a module: any failure in it is one line naming `where` and the call
    (not a traceback); it must return an nn.Module; `weights` ("" / "none": none) a local file loaded into it.
    Both kinds of a module:function (whole classifier, backbone) are built through here."""
    from torch import nn
    try:
        model = fn(**kwargs)
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is one line naming it, not a traceback
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())[:200]
        raise ConfigError(f"{where}: {fn.__name__}({args}) raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: {fn.__name__}() returned {type(model).__name__}, not an nn.Module")
    if weights not in ("", "none"):
        from cnnlab.models.weights import load_state
        try:
            model.load_state_dict(load_state(Path(weights).expanduser()))
        except RuntimeError as e:
            raise CnnlabError(f"[model] weights = {weights!r} does not fit {where}: "
                              f"{str(e).splitlines()[0][:300]}") from None
    return model


def _file_of(module) -> str:
    f = getattr(module, "__file__", None)
    return str(Path(f).resolve()) if f else "<no file>"


def _user_modules(cfg: ModelConfig) -> list[str]:
    """The user's modules this model's code comes from: [model] module, a module:function's module, and the
    module of a registered function that is neither cnnlab's nor a plugin's."""
    from cnnlab.models import _MODELS, is_registered
    from cnnlab.models.trust import is_code
    mods = [cfg.module] if cfg.module else []
    if is_code(cfg.name):
        mods.append(cfg.name.split(":")[0])
    elif is_registered(cfg.name) and cfg.name not in ORIGIN:
        m = _MODELS[cfg.name].__module__
        if not m.startswith("cnnlab."):
            mods.append(m)
    return list(dict.fromkeys(mods))


def module_to_record(cfg: ModelConfig) -> str:
    """[model] module as the run's config.toml records it: the one given, else the importable module that
    registered the net from Python (so `cnnlab predict` in another process imports it), else ''."""
    if cfg.module:
        return cfg.module
    from cnnlab.models.trust import is_code
    mods = [] if is_code(cfg.name) else _user_modules(cfg)
    return mods[0] if mods and mods[0] != "__main__" else ""


def model_code(cfg: ModelConfig) -> dict:
    """meta.json "model_code": where the model's code came from, for the error of a later process that lacks it.
    {} for cnnlab's, timm's and torchvision's models."""
    out: dict = {}
    mods = [{"module": m, "file": _file_of(sys.modules[m]) if m in sys.modules else "<not imported>"}
            for m in _user_modules(cfg)]
    if mods:
        out["modules"] = mods
    if cfg.name in ORIGIN:
        out["plugin"] = ORIGIN[cfg.name]
    return out


def import_run_code(cfg: ModelConfig, meta: dict, where: str) -> None:
    """Before a model is rebuilt from a run folder (after models.trust allowed it): import its code, or say in one
    line where that code was when the run trained and how to make it importable here."""
    from cnnlab.models import is_registered
    from cnnlab.models.trust import is_code
    recorded = {m.get("module"): m.get("file", "?") for m in (meta.get("model_code") or {}).get("modules", [])}
    for mod in ([cfg.module] if cfg.module else []) + ([cfg.name.split(":")[0]] if is_code(cfg.name) else []):
        if mod in recorded and _missing(mod):
            raise CnnlabError(f"{where}: module {mod!r} is not importable here (not on the Python path); it was "
                              f"{recorded[mod]} when the run trained: add {_root(mod, recorded[mod])} to "
                              f"PYTHONPATH or pass --code-dir {_root(mod, recorded[mod])}")
        try:
            import_module(mod, "[model] module")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if is_code(cfg.name) or is_registered(cfg.name):
        return
    plugin = (meta.get("model_code") or {}).get("plugin")
    if plugin:
        raise CnnlabError(f"{where}: model {cfg.name!r} came from the plugin {plugin['distribution']} "
                          f"{plugin.get('version', '')} (entry point {plugin['entry_point']} in group {GROUP}), "
                          f"which is not installed here: pip install {plugin['distribution']}")
    if "__main__" in recorded:
        raise CnnlabError(f"{where}: model {cfg.name!r} was registered by {recorded['__main__']} (a script or "
                          f"notebook) when the run trained: register it in this process before loading, or move it "
                          f"into a module and set [model] module (README: Add a model)")
