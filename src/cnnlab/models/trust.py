"""Which models a run folder may rebuild without the user's say-so.

Run folders are what users send each other, so re-creating a model from one must not run code the receiver
did not choose to run. cnnlab's registered models, timm names and `tv:` torchvision names are looked up in
those libraries' own tables of constructors: loading them runs no code from the folder. A
`package.module:function` backbone imports a module and calls a function that the folder's config.toml
names: `os:system` with `[model.args] command = "..."` would run a shell command. So a folder's
`module:function`, or a `[model] module` to import, is loaded only when the user says they trust it (`--trust-code`, `trust_code=True`, as
Hugging Face's `trust_remote_code`). A config the user runs themselves (`cnnlab run my.toml`) is trusted:
they wrote it.
"""
from __future__ import annotations

import re

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError

# A dotted module path and one function name, identifiers only: nothing that import machinery could read
# as a file path, a URL or an expression.
_ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_LITERALS = (str, int, float, bool)


class UntrustedCode(ConfigError):
    """A run folder names code to import, and the user has not said to trust it."""


def is_code(name: str) -> bool:
    """Whether [model] name is a `module:function` entry (imported and called), not a library's name."""
    return ":" in name and not name.startswith("tv:")


def parse_entry(name: str, where: str = "[model] name") -> tuple[str, str]:
    """('package.module', 'function') of a `module:function` entry; a ConfigError for anything else."""
    if not _ENTRY.fullmatch(name):
        raise ConfigError(f"{where} = {name!r} is not a 'package.module:function' entry (a dotted module path, "
                          f"a colon, a function name; letters, digits and _ only)")
    module, function = name.split(":")
    return module, function


def check_literals(args, where: str) -> None:
    """[model.args]: numbers, strings, booleans, and lists/tables of those (no dates, no Python objects)."""
    def bad(v) -> bool:
        if isinstance(v, dict):
            return any(not isinstance(k, str) or bad(x) for k, x in v.items())
        if isinstance(v, list):
            return any(bad(x) for x in v)
        return not isinstance(v, _LITERALS)
    if not isinstance(args, dict) or bad(args):
        raise ConfigError(f"{where}: [model.args] may hold only numbers, strings, booleans and lists/tables of "
                          f"those; got {args!r}"[:300])


def check_trusted(model_cfg: ModelConfig, trust_code: bool, where: str) -> None:
    """Before a model is rebuilt from a run folder: raises, importing nothing, unless the model is a library's
    (cnnlab, timm, torchvision) or the user trusts the folder's code. `where`: the folder's config.toml."""
    check_literals(model_cfg.args, where)
    if model_cfg.module and not trust_code:
        # importing a module runs its top-level code: the same say-so as a function
        raise UntrustedCode(
            f"{where}: [model] module = {model_cfg.module!r} is code: rebuilding this model imports it (for its "
            f"@register_model net {model_cfg.name!r}). cnnlab runs code from a run folder only when you trust "
            f"whoever made it: pass --trust-code (Python: trust_code=True)")
    if not is_code(model_cfg.name):
        return
    module, function = parse_entry(model_cfg.name, f"{where}: [model] name")
    if not trust_code:
        raise UntrustedCode(
            f"{where}: [model] name = {model_cfg.name!r} is code: rebuilding this model imports {module} and calls "
            f"its {function}(). cnnlab runs code from a run folder only when you trust whoever made it: "
            f"pass --trust-code (Python: trust_code=True)")
