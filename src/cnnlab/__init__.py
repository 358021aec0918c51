"""cnnlab: convolutional-network image-classification experiments, fast and reproducible.

From Python: `cnnlab.run(...)`, `cnnlab.suite(...)` and `cnnlab.load(run_dir)` (see cnnlab.api).
They are imported on first use, so `import cnnlab` stays light.
"""

__version__ = "0.2.0"

_API = ("run", "suite", "load", "Run", "Suite", "Model", "load_model", "export_run")


def __getattr__(name: str):
    if name in _API:
        from cnnlab import api
        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
