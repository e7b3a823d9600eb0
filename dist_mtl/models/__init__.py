"""Shared encoders, task heads and the MultiTaskModel that joins them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dist_mtl.models.encoders import LeNetEncoder, MLPEncoder, ResNet18Encoder
from dist_mtl.models.multitask import MultiTaskModel
from dist_mtl.models.norm import NORM_NAMES, SyncBatchNorm2d, group_count, norm_layer

ENCODER_NAMES = ("mlp", "lenet", "resnet18")
# Encoders with normalisation layers, the only ones `norm` applies to (mlp and lenet have none).
NORMED_ENCODERS = ("resnet18",)


def build_model(
    encoder: str,
    input_shape: Sequence[int],
    num_classes: Sequence[int],
    *,
    hidden: Sequence[int] = (256, 256),
    rep_dim: int = 64,
    width: int = 64,
    norm: str = "batch",
) -> MultiTaskModel:
    """Build an encoder by name and one linear head per task (`num_classes[t]` logits each).

    `norm` (batch | sync | group, `dist_mtl.models.norm`) picks the normalisation layers of encoders
    that have them; on the others only the default, batch, is accepted (it changes nothing there).
    """
    if norm not in NORM_NAMES:
        raise ValueError(f"model.norm must be one of {', '.join(NORM_NAMES)}; got {norm!r}")
    if norm != "batch" and encoder in ENCODER_NAMES and encoder not in NORMED_ENCODERS:
        raise ValueError(
            f"model.norm={norm!r} needs an encoder with normalisation layers ({', '.join(NORMED_ENCODERS)}); "
            f"model.encoder {encoder!r} has none (leave model.norm at batch)"
        )
    if encoder == "mlp":
        enc: nn.Module = MLPEncoder(input_shape, hidden, rep_dim)
    elif encoder == "lenet":
        if len(input_shape) != 3:
            raise ValueError(
                f"model.encoder 'lenet' needs (C, H, W) inputs, got input shape {tuple(input_shape)}"
            )
        enc = LeNetEncoder(input_shape, out_dim=rep_dim)
    elif encoder == "resnet18":
        if len(input_shape) != 3:
            raise ValueError(
                f"model.encoder 'resnet18' needs (C, H, W) inputs, got input shape {tuple(input_shape)}"
            )
        enc = ResNet18Encoder(input_shape, width=width, norm=norm)
    else:
        raise ValueError(f"model.encoder must be one of {', '.join(ENCODER_NAMES)}; got {encoder!r}")
    heads = [nn.Linear(enc.out_dim, k) for k in num_classes]
    return MultiTaskModel(enc, heads)


__all__ = [
    "ENCODER_NAMES",
    "NORMED_ENCODERS",
    "NORM_NAMES",
    "LeNetEncoder",
    "MLPEncoder",
    "MultiTaskModel",
    "ResNet18Encoder",
    "SyncBatchNorm2d",
    "build_model",
    "group_count",
    "norm_layer",
]
