"""Frozen-backbone features, computed once and cached on disk.

The practice ran ResNet50 over every image for each experiment. Here the pooled features of a
(backbone, weights, data, image size, preprocessing) combination are computed once and stored under
the cache folder; every later run with the same combination loads them in a fraction of a second,
and the head then trains on (N, D) vectors in seconds. Each view (the image, its mirror) is cached on its
own: a run that averages both shares the image's features with the runs that use only those.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from tqdm.auto import tqdm

from cnnlab.preprocess import Normalizer, center_crop
from cnnlab.data.images import cache_dir
from cnnlab.device import autocast
from cnnlab.models.backbones import mean_of_views
from cnnlab.runs import save_checkpoint


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes() if x.device.type == "cpu" else x.cpu().numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """Identifies the backbone's actual weights, whatever their origin (tag, local file, random + seed)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def extract(backbone: nn.Module, x: torch.Tensor, norm: Normalizer, size: int, crop: float, device: torch.device,
            bf16: bool, batch_size: int = 64, desc: str = "features", quiet: bool = False,
            mirror: bool = False) -> torch.Tensor:
    """Pooled features of uint8 images: normalize, center view at `size` (mirrored: flipped left-right after
    the crop, as TransferNet flips its input), forward; float32 (N, D) on CPU."""
    backbone.eval().to(device, memory_format=torch.channels_last)
    out = []
    with tqdm(total=len(x), unit="img", desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        for i in range(0, len(x), batch_size):
            xb = norm(x[i:i + batch_size].to(device))
            if xb.shape[-1] != size:
                xb = center_crop(xb, crop, size)
            if mirror:
                xb = xb.flip(-1)
            with autocast(device, bf16):
                f = backbone(xb.contiguous(memory_format=torch.channels_last)).flatten(1)
            out.append(f.float().cpu())
            bar.update(len(xb))
    return torch.cat(out)


def cached_features(backbone: nn.Module, identity: dict, x: torch.Tensor, y: torch.Tensor, norm: Normalizer,
                    size: int, crop: float, device: torch.device, bf16: bool, split: str,
                    quiet: bool = False, flip_average: bool = False) -> tuple[torch.Tensor, bool]:
    """Features of one split, from the cache when present; with flip_average the mean of the image's and its
    mirror's (what TransferNet(flip_average=True) computes). Returns (features, all loaded from cache)."""
    views = [cached_view(backbone, identity, x, y, norm, size, crop, device, bf16, split, quiet, mirror)
             for mirror in ((False, True) if flip_average else (False,))]
    return mean_of_views([f for f, _ in views]), all(hit for _, hit in views)


def cached_view(backbone: nn.Module, identity: dict, x: torch.Tensor, y: torch.Tensor, norm: Normalizer,
                size: int, crop: float, device: torch.device, bf16: bool, split: str, quiet: bool,
                mirror: bool) -> tuple[torch.Tensor, bool]:
    """One view's features, from the cache when present. Returns (features, loaded_from_cache)."""
    ident = {**identity, "split": split, "data": data_fingerprint(x, y), "size": size, "crop": crop,
             "norm": norm.state_dict(), "bf16": bf16}
    if mirror:      # only then: the image's own key stays what it was, and so do existing caches
        ident["view"] = "mirror"
    path = cache_dir() / "features" / f"{feature_key(ident)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["identity"] == json.loads(json.dumps(ident)):
                return blob["features"], True
        except (OSError, RuntimeError, KeyError):
            pass  # unreadable cache file: recompute
    feats = extract(backbone, x, norm, size, crop, device, bf16, desc=f"features {split}{' mirrored' * mirror}",
                    quiet=quiet, mirror=mirror)
    save_checkpoint(path, {"identity": ident, "features": feats})
    return feats, False
