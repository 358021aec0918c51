"""A model run over stored images for scores: the one evaluation path.

The training loop's validation and test scores, `cnnlab evaluate`, `cnnlab.load(run).predict` and the CLI's
predict all come here, so the same images give the same logits whichever way they were asked for: the run's one
`Preprocess`, its batching rule (`eval_batch_size`), its memory layout and the precision the run scored with.
Two paths that batched differently, or that each timed 'auto' precision for themselves, once scored one run's test
split 0.2140 in results.json and 0.2120 in `cnnlab evaluate` (bf16 at evaluation, fp32 in the run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.data.preprocess import Preprocess, eval_batch_size, layout
from cnnlab.data.stream import Batches, Streamed
from cnnlab.runtime.device import autocast


@dataclass
class Scoring:
    """How a run's network is scored: recorded in the run folder (results.json "scoring"), reused by every
    later command."""
    eval_batch: int = 500            # [train] eval_batch_size (32x32 images)
    train_batch: int = 64            # [train] batch_size: the smallest evaluation batch
    channels_last: bool = True
    bf16: bool = False

    def batch_size(self, side: int) -> int:
        return eval_batch_size(self.eval_batch, self.train_batch, side)

    def to_dict(self) -> dict:
        return {"eval_batch": self.eval_batch, "train_batch": self.train_batch,
                "channels_last": self.channels_last, "bf16": self.bf16}

    @classmethod
    def from_dict(cls, d: dict) -> "Scoring":
        return cls(int(d["eval_batch"]), int(d["train_batch"]), bool(d["channels_last"]), bool(d["bf16"]))


def network_input(preprocess: Preprocess, xb: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images through the run's Preprocess; anything else (cached features, float images) as it is."""
    return preprocess(xb, channels_last) if xb.dtype == torch.uint8 else layout(xb, channels_last)


@torch.no_grad()
def logits(model: nn.Module, preprocess: Preprocess, data: Batches | Streamed, scoring: Scoring,
           device: torch.device, part: slice | None = None) -> torch.Tensor:
    """float32 logits (N, K) of a split (or of positions `part` of it), on the device, in eval mode, batched
    by the scoring rule. `model` is what scores: the network, or its test-time-views wrapper."""
    model.eval()
    side = (preprocess.input_size or data.x.shape[-1]) if getattr(data.x, "ndim", 0) == 4 else 0
    bs = scoring.batch_size(side)
    start, stop = (0, len(data)) if part is None else (part.start, part.stop)
    out = []
    for xb, _ in data.batches(None, [slice(i, min(i + bs, stop)) for i in range(start, stop, bs)]):
        with autocast(device, scoring.bf16):
            out.append(model(network_input(preprocess, xb, scoring.channels_last)).float())
    return torch.cat(out) if out else torch.zeros(0, 0, device=device)
