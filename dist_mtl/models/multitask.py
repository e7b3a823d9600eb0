"""MultiTaskModel: one shared encoder, T linear heads, and the views of its parameters the engine needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiTaskModel(nn.Module):
    """Shared encoder plus one head per task.

    `encode` gives the representation Z (what MGDA-UB differentiates against); `head_logits`
    applies a subset of heads, so a rank that owns only some tasks never touches the others.
    """

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def head_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for p in self.heads[task].parameters() if p.requires_grad]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def head_logits(self, z: torch.Tensor, tasks: Sequence[int]) -> list[torch.Tensor]:
        return [self.heads[t](z) for t in tasks]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head_logits(self.encode(x), range(self.num_tasks))
