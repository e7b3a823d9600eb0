"""The in-memory representation every data set is delivered in: inputs plus one class index per task."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TaskSpec:
    """One classification task, trained with cross-entropy over ``num_classes`` logits (binary: 2)."""

    name: str
    num_classes: int


@dataclass
class MultiTaskDataset:
    """One split held in memory; the trainer draws batches from it by index.

    ``x`` is float32 ``(N, *input_shape)`` and already normalised; ``y`` is int64 ``(N, T)`` with
    ``y[:, t]`` in ``[0, tasks[t].num_classes)``, or -1 where the sample has no label for task t.
    """

    x: torch.Tensor
    y: torch.Tensor
    tasks: tuple[TaskSpec, ...]

    def __post_init__(self) -> None:
        # Checked once here so that a mismatched builder fails at construction, not deep in a loss.
        if self.x.dtype != torch.float32:
            raise ValueError(f"MultiTaskDataset.x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64 or self.y.dim() != 2:
            raise ValueError(
                f"MultiTaskDataset.y must be int64 (N, T), got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"MultiTaskDataset: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if self.y.shape[1] != len(self.tasks):
            raise ValueError(f"MultiTaskDataset: y has {self.y.shape[1]} columns but {len(self.tasks)} tasks")
        for t, task in enumerate(self.tasks):
            column = self.y[:, t]
            if column.numel() and (column.min() < -1 or column.max() >= task.num_classes):
                raise ValueError(
                    f"MultiTaskDataset: labels of task {task.name!r} must lie in [0, {task.num_classes}) "
                    "or be -1 (no label), "
                    f"got [{int(column.min())}, {int(column.max())}]"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, without the batch dimension."""
        return tuple(self.x.shape[1:])


@dataclass
class Batch:
    """One data-parallel part of a global batch, ready for a step: on the device and normalised.

    ``y[:, t] == -1`` marks a sample without a label for task t (missing, or a corrupt sample masked
    by ``data.on_error=skip``); ``skipped`` counts such masked samples in this batch, on the host.
    """

    x: torch.Tensor
    y: torch.Tensor
    skipped: int = 0


class BatchSource(Protocol):
    """What the trainer reads data through: the in-memory ``MemorySource`` or the streamed ``ShardSource``.

    Batches are a pure function of (seed, step, part): ``part`` = (index, parts) says which of
    ``parts`` disjoint parts of every global batch of ``batch_size`` samples this rank reads.
    """

    tasks: tuple[TaskSpec, ...]
    input_shape: tuple[int, ...]

    def train_count(self) -> int:
        """Samples in the training split."""
        ...

    def steps_per_epoch(self, batch_size: int, parts: int) -> int:
        """Global batches per epoch (drop-last); a ConfigError names data.batch_size if there are none."""
        ...

    def position(self, step: int, batch_size: int, parts: int) -> dict[str, int]:
        """Where `step` is in the data ({"epoch", "batch", ...}), recorded in checkpoints."""
        ...

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
        """This part's batches of steps start_step, ..., total_steps - 1, on `device`."""
        ...

    def eval_batches(
        self, *, batch_size: int, part: tuple[int, int], device: torch.device
    ) -> Iterator[Batch]:
        """This part's share of the evaluated split; the parts together cover it once."""
        ...
