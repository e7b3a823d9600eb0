"""Shared encoders: each maps a batch of inputs to a flat representation Z of width `out_dim`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dist_mtl.models.norm import norm_layer


class MLPEncoder(nn.Module):
    """Fully connected encoder; the communication-heavy case (many parameters, little compute)."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden, out_dim]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNetEncoder(nn.Module):
    """LeNet-style CNN (the MultiMNIST encoder of the MGDA paper), padded so 8x8 inputs work too."""

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int] = (10, 20), out_dim: int = 50
    ) -> None:
        super().__init__()
        c_in, h, w = input_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * (h // 4) * (w // 4)
        self.project = nn.Sequential(nn.Linear(flat, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block with an identity or 1x1 projection shortcut; `norm` as `norm_layer`."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Encoder(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), the shared encoder of the MGDA CelebA recipe.

    `width` scales every stage (64 in the paper); smaller widths keep CPU tests fast. `norm`
    (`dist_mtl.models.norm`): batch (BatchNorm: every rank of a task group sees the same batch, so
    its statistics agree within the group, but replicas normalise their own slices), sync (BatchNorm
    over the replicas: equals one process on the global batch) or group (GroupNorm).
    Parameter initialisation does not depend on `norm` (norm layers start at weight 1, bias 0).
    """

    def __init__(
        self, input_shape: Sequence[int], width: int = 64, out_dim: int | None = None, norm: str = "batch"
    ) -> None:
        super().__init__()
        c_in = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, width, 3, stride=1, padding=1, bias=False), norm_layer(norm, width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project: nn.Module = nn.Identity() if out_dim is None else nn.Linear(c, out_dim)
        self.out_dim = c if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(self.stages(self.stem(x))))
