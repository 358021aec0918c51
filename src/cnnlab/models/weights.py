"""Pretrained weights from a local file ([model] weights = "FILE"): safetensors, or a torch file read with
weights_only=True (tensors and plain containers only: a file holding other Python objects is refused)."""
from __future__ import annotations

from pathlib import Path

import torch

from cnnlab.errors import CnnlabError


def load_state(path: Path) -> dict:
    """A state dict from a local weights file (.safetensors, or a torch file read with weights_only=True)."""
    if not path.is_file():
        raise CnnlabError(f"[model] weights = '{path}': file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
