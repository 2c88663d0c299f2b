"""Which images each rank trains on in an epoch, and the seed of every random draw.

Every draw is a pure function of (seed, epoch, rank, position), never of a process's RNG
state: loader workers are persistent (nobody reseeds them between epochs) and their number
follows the hardware, so a result that depended on which process augmented which image
would change with the machine and break exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

ORDER, SAMPLE, BATCH = 0, 1, 2  # what a seed is for: keeps the three streams apart


def mixed_seed(purpose: int, *parts: int) -> int:
    """A well-mixed 32-bit seed (torch's CPU generator keeps only 32 bits of a seed)."""
    return int(np.random.SeedSequence((purpose, *parts)).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): this rank's share of one seeded permutation per epoch.

    The epoch travels with each index, so the dataset can seed that sample's augmentation
    from it in whichever worker process serves it. Ranks split one shared permutation,
    padded by wrapping (as DistributedSampler does) so every rank takes the same steps.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mixed_seed(ORDER, self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = (order * math.ceil(len(self) * self.world / self.size))[: len(self) * self.world]
        return iter([(self.epoch, index) for index in padded[self.rank :: self.world]])
