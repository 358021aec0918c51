"""cnnlab: convolutional-network image-classification experiments, fast and reproducible.

From Python: `cnnlab.run(...)`, `cnnlab.suite(...)`, `cnnlab.load(run_dir)`, `cnnlab.tune(...)` and
`cnnlab.lr_find(...)` (see cnnlab.api).
They are imported on first use, so `import cnnlab` stays light.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("cnnlab")      # the installed distribution's: one number, kept in pyproject.toml
except PackageNotFoundError:              # a source checkout on PYTHONPATH, not installed
    __version__ = "unknown"

_API = ("run", "suite", "load", "Run", "Suite", "Model", "load_model", "export_run", "tune", "lr_find")


def __dir__() -> list[str]:
    """The lazily imported API too, so tab completion (Jupyter, IPython) offers cnnlab.run, cnnlab.load, ..."""
    return sorted({*globals(), *_API} - {"PackageNotFoundError", "_version"})


def __getattr__(name: str):
    if name in _API:
        from cnnlab import api
        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
