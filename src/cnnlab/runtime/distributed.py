"""Data-parallel training under torchrun (DDP): the same config on N processes, one or several nodes.

How the work is split: every rank draws the same shuffling and augmentation (same seed), so every rank
knows the whole global batch; each rank computes its contiguous shard of it. The loss of a shard is
scaled so that DDP's gradient average equals the gradient of the global batch's mean loss: a run on N
processes takes the same steps as one process with the same global batch (up to float summation order).
Epoch metrics are summed across ranks with one all_reduce; only rank 0 writes the run folder.

BatchNorm layers compute their batch statistics per rank (standard DDP); with small shards that differs
from one process with the whole batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (the first ranks take one more when n % world != 0)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


def init_from_env() -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _INFO
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        # N processes on one machine's CPUs: share the cores instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return _INFO


def device_for(requested: str) -> str:
    """Under DDP with GPUs, each process uses its own GPU."""
    if _INFO.enabled and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return f"cuda:{_INFO.local_rank}"
    return requested


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if _INFO.enabled:
        for t in tensors:
            if t.device.type == "cpu" and dist.get_backend() == "nccl":    # NCCL reduces GPU tensors only
                g = t.cuda()
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                t.copy_(g)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)


def shutdown() -> None:
    """Leave the process group cleanly (all ranks together); without it gloo may abort at exit."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. the folder rank 0 created); obj itself on one process."""
    if not _INFO.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()
