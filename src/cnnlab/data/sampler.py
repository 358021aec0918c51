"""The order of a training epoch when the classes are imbalanced: `[data] sampler = "balanced"`.

An epoch keeps its length (as many draws as training images, so the steps and the learning-rate schedule
are those of a shuffled epoch) but each class gets an equal share of the draws: n / K each, the remainder
going to classes chosen by the draw. Within a class the images are used in turns (a fresh permutation of
the class, repeated as often as its share needs), so a small class repeats each image about equally often
and a large class shows a different subset each epoch; the epoch's draws are then shuffled together.

The draw depends on (seed, epoch) only, never on a generator's history: a run resumed at epoch e draws
exactly what the uninterrupted run drew, and every DDP rank draws the same order.
"""
from __future__ import annotations

import numpy as np
import torch


class BalancedSampler:
    """`order(epoch)`: positions into the training split, each class drawn equally often."""

    STREAM = 4          # the seed's other streams: shuffling 1, augmentation 2, alternating flips 3 (engine.py)

    def __init__(self, labels: torch.Tensor, seed: int):
        y = labels.detach().cpu().long()
        self.n, self.seed = len(y), seed
        # the positions of each class present in the split (a class without training images gets no draws)
        self.members = [torch.nonzero(y == c).flatten() for c in torch.unique(y).tolist()]

    def generator(self, epoch: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.STREAM, epoch]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def shares(self, g: torch.Generator) -> list[int]:
        """How many draws each class gets this epoch: n // K, plus one for n % K classes drawn by `g`."""
        k = len(self.members)
        shares = [self.n // k] * k
        for c in torch.randperm(k, generator=g)[: self.n % k].tolist():
            shares[c] += 1
        return shares

    def order(self, epoch: int) -> torch.Tensor:
        g = self.generator(epoch)
        picks = []
        for idx, share in zip(self.members, self.shares(g)):
            turns = -(-share // len(idx))                      # whole passes over the class needed
            perm = torch.cat([idx[torch.randperm(len(idx), generator=g)] for _ in range(turns)])
            picks.append(perm[:share])
        drawn = torch.cat(picks)
        return drawn[torch.randperm(len(drawn), generator=g)]


def make_sampler(kind: str, labels: torch.Tensor, seed: int) -> BalancedSampler | None:
    """[data] sampler: None for "shuffle" (the trainer's own permutation), else the balanced draw."""
    return BalancedSampler(labels, seed) if kind == "balanced" else None
