"""The cache folder: decoded image caches, feature caches, measured precision choices."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CNNLAB_CACHE, else $XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab."""
    base = os.environ.get("CNNLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"
    return Path(base)
