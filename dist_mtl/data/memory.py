"""The bundled small data sets (MultiDigits, synthetic) as a batch source: splits held in memory.

The same interface as the streamed ``ShardSource``, so the trainer has one loop for both. Batches are
a pure function of (seed, step): the epoch's permutation comes from a generator seeded by
(seed, epoch), its drop-last slices are the global batches, and part ``index`` of ``parts`` takes
its contiguous share of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dist_mtl.data.base import Batch, MultiTaskDataset, TaskSpec
from dist_mtl.errors import ConfigError


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    if batch_size > num_samples:
        raise ConfigError(
            f"data.batch_size {batch_size} exceeds the {num_samples} training samples; "
            f"use at most {num_samples}"
        )
    return num_samples // batch_size


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch of `step`: drop-last batches of a per-epoch seeded permutation."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=gen)
    return perm[i * batch_size : (i + 1) * batch_size]


def part_rows(size: int, part: tuple[int, int]) -> slice:
    """Part ``index`` of ``parts`` equal contiguous shares of ``size`` rows (``parts`` divides ``size``)."""
    index, parts = part
    n = size // parts
    return slice(index * n, (index + 1) * n)


class MemorySource:
    """(train, test) splits in memory, served as the trainer's batch source."""

    def __init__(self, train: MultiTaskDataset, test: MultiTaskDataset) -> None:
        self.train, self.test = train, test
        self.tasks: tuple[TaskSpec, ...] = train.tasks
        self.input_shape = train.input_shape

    def train_count(self) -> int:
        return len(self.train)

    def steps_per_epoch(self, batch_size: int, parts: int) -> int:
        return steps_per_epoch(len(self.train), batch_size)

    def position(self, step: int, batch_size: int, parts: int) -> dict[str, int]:
        epoch, batch = divmod(step, self.steps_per_epoch(batch_size, parts))
        return {"epoch": epoch, "batch": batch, "sample": batch * batch_size}

    def train_batches(
        self,
        *,
        seed: int,
        batch_size: int,
        part: tuple[int, int],
        start_step: int,
        total_steps: int,
        device: torch.device,
    ) -> Iterator[Batch]:
        rows = part_rows(batch_size, part)
        for step in range(start_step, total_steps):
            idx = batch_indices(len(self.train), batch_size, seed, step)[rows]
            x = self.train.x[idx].to(device, non_blocking=True)
            yield Batch(x, self.train.y[idx].to(device, non_blocking=True))

    def eval_batches(
        self, *, batch_size: int, part: tuple[int, int], device: torch.device
    ) -> Iterator[Batch]:
        """This part's contiguous share of the test split (any number of parts; a share may be empty)."""
        index, parts = part
        n = len(self.test)
        first, last = n * index // parts, n * (index + 1) // parts
        for start in range(first, last, batch_size):
            stop = min(start + batch_size, last)
            yield Batch(self.test.x[start:stop].to(device), self.test.y[start:stop].to(device))
