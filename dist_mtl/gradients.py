"""Flat views of gradients: task gradients as rows of one matrix, and a flat buffer backing `.grad`.

The shared parameters' gradients live in one contiguous buffer whose slices are the parameters'
`.grad` tensors, so writing a direction d into the buffer is one copy, with no loop over
parameter tensors in the per-step path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def flatten_grads(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Concatenate per-parameter gradients into one vector; unused parameters contribute zeros."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


class FlatGradBuffer:
    """One contiguous gradient buffer whose slices are attached as the parameters' `.grad`."""

    def __init__(self, params: Sequence[nn.Parameter], out: torch.Tensor | None = None) -> None:
        """`out` (optional, at least as long as the parameters) lets the buffer live inside a larger one,
        so that gradients and whatever travels with them go through one collective."""
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)
        first = self.params[0]
        if out is None:
            out = torch.zeros(self.numel, dtype=first.dtype, device=first.device)
        self.buffer = out
        self.attach()

    def attach(self) -> None:
        """(Re)attach the views; needed after anything that replaced `.grad` (e.g. zero_grad(set_to_none))."""
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def write(self, flat: torch.Tensor) -> None:
        self.buffer.copy_(flat)


MISSING_LABEL = -1  # a target of -1: this sample has no label for this task


def labelled_counts(targets: torch.Tensor) -> torch.Tensor:
    """(T,) float32 count of labelled samples per task (targets != -1), on the targets' device."""
    return (targets != MISSING_LABEL).sum(0, dtype=torch.float32)


def task_loss_list(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, counts: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Cross-entropy of each task averaged over its labelled samples, each its own graph root.

    `targets` is (B, T) class indices, -1 where a sample has no label for the task. Task t's loss is
    the sum over its labelled samples divided by `counts[t]`, the number of labelled samples of t in
    the whole (global) batch: the default counts this batch; a data-parallel part passes the global
    counts, so that summing the parts' losses and gradients gives the global batch's. A task with no
    label in the batch has loss 0 and a zero gradient (the sum over nothing, divided by 1).

    Differentiate task t through its own entry: indexing a stacked tensor instead would run every
    head's backward (with zero gradients) for every task, O(T) per task and O(T^2) per step.
    """
    inverse = 1.0 / (labelled_counts(targets) if counts is None else counts).clamp_min(1.0)
    return [
        nn.functional.cross_entropy(out, targets[:, i], ignore_index=MISSING_LABEL, reduction="sum")
        * inverse[i]
        for i, out in enumerate(logits)
    ]


def task_losses(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """The task losses as one (T,) tensor, for whole-vector uses (sums, copies)."""
    return torch.stack(task_loss_list(logits, targets, counts))


def flatten_parameters(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Move the tensors' storage (parameters or buffers) into one flat tensor and return it; each
    tensor becomes a view of it.

    In-place updates (optimizer steps, `load_state_dict`) keep writing into the flat tensor, so a
    checksum or a collective over all of them is one operation instead of a loop over tensors.
    """
    params = list(params)
    if not params:
        return torch.zeros(0)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat
