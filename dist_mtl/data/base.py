"""The in-memory representation every data set is delivered in: inputs plus one class index per task."""

from __future__ import annotations

from dataclasses import dataclass

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
    ``y[:, t]`` in ``[0, tasks[t].num_classes)``.
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
            if column.numel() and (column.min() < 0 or column.max() >= task.num_classes):
                raise ValueError(
                    f"MultiTaskDataset: labels of task {task.name!r} must lie in [0, {task.num_classes}), "
                    f"got [{int(column.min())}, {int(column.max())}]"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, without the batch dimension."""
        return tuple(self.x.shape[1:])
