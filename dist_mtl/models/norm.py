"""Normalisation layers of the encoders: `model.norm` = batch | sync | group.

- `batch`: `nn.BatchNorm2d`. Statistics of the batch a process sees: in a distributed run each
  replica normalises its own slice of the global batch (the engine averages the running statistics
  over the replicas before every evaluation and checkpoint).
- `sync`: `SyncBatchNorm2d`, a `BatchNorm2d` whose training statistics are summed over a group of
  ranks when the engine gives it an `all_reduce` (see `dist_mtl.engine.sync_norm`); the distributed
  forward and backward then equal BatchNorm on the concatenated (global) batch. Without one (a single
  process) it is plain BatchNorm, and its state dict is BatchNorm's, so checkpoints move freely.
- `group`: `nn.GroupNorm` with `group_count(C)` groups: the largest divisor of C not above 32 nor
  C / 2, so 32 groups for C = 64 ... 512 (the GroupNorm paper's default) and groups of two channels
  for narrower layers (C = 4 ... 32 in test encoders): a one-channel group of a 1 x 1 map would
  normalise a single value to zero. Independent of the batch: nothing to synchronise.

torch.nn.SyncBatchNorm needs CUDA and NCCL; `SyncBatchNorm2d` runs anywhere an all-reduce does
(gloo on CPU, NCCL on CUDA), one all-reduce per layer in the forward and one per layer in each
backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NORM_NAMES = ("batch", "sync", "group")
MAX_GROUPS = 32

AllReduce = Callable[[torch.Tensor], None]  # in-place sum over the ranks that share statistics


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """The largest divisor of `channels` not above `max_groups` nor `channels // 2` (GroupNorm needs
    groups | channels; two channels per group at least, so a group is never one channel of a tiny map)."""
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation layer `norm` (batch | sync | group) for a feature map of `channels` channels."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "sync":
        return SyncBatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"model.norm must be one of {', '.join(NORM_NAMES)}; got {norm!r}")


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with statistics over every rank that `all_reduce` sums over (plain BatchNorm without).

    In training mode with `all_reduce` set, the batch mean and variance are those of the union of the
    ranks' batches, the backward pass reduces the two per-channel sums the input gradient needs, and
    the running statistics are updated exactly as BatchNorm would on the union: with the global mean
    and the unbiased variance of the global count. The affine parameters get this rank's share of
    their gradient (summing over ranks, as the engine's gradient reduction does, gives the total).
    Every rank of the group must run the same forward and backward passes in the same order.
    """

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.all_reduce: AllReduce | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is None or not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        # The momentum logic of nn.BatchNorm: a cumulative average when momentum is None.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return SyncBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.eps,
            factor,
            self.all_reduce,
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the union of the ranks' batches (channels on dim 1).

    Forward: one all-reduce of [sum x, sum x^2, count] per channel (float64: the variance is a
    difference of sums); backward: one all-reduce of [sum dy, sum dy * x_hat] per channel. With an
    `all_reduce` that does nothing this is BatchNorm of one process.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        factor: float,
        all_reduce: AllReduce,
    ) -> torch.Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        local = x.numel() // c
        # Local sums from the local (two-pass) mean and variance, so no sum of squares is ever
        # accumulated in float32.
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        stats = torch.empty(2 * c + 1, dtype=torch.float64, device=x.device)
        mean64 = mean.double()
        torch.mul(mean64, local, out=stats[:c])
        torch.mul(var.double() + mean64 * mean64, local, out=stats[c : 2 * c])
        stats[2 * c] = local
        all_reduce(stats)
        count = stats[2 * c]
        mean64 = stats[:c] / count
        var64 = (stats[c : 2 * c] / count - mean64 * mean64).clamp_(min=0.0)
        mean, var = mean64.to(x.dtype), var64.to(x.dtype)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            if running_var is not None:
                unbiased = var64 * (count / (count - 1.0).clamp(min=1.0))
                running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        out = nn.functional.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, count.to(x.dtype))
        ctx.all_reduce = all_reduce
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        sums = torch.empty(2 * c, dtype=grad_out.dtype, device=grad_out.device)
        torch.sum(grad_out, dim=dims, out=sums[:c])
        torch.sum(grad_out * x_hat, dim=dims, out=sums[c:])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # This rank's share of the affine gradients: copied before the reduction overwrites `sums`.
        grad_w = sums[c:].clone() if need_w and weight is not None else None
        grad_b = sums[:c].clone() if need_b else None
        grad_x = None
        if need_x:
            ctx.all_reduce(sums)
            sums.div_(count)
            scale = invstd if weight is None else invstd * weight
            grad_x = (grad_out - sums[:c].view(shape) - x_hat * sums[c:].view(shape)) * scale.view(shape)
        return grad_x, grad_w, grad_b, None, None, None, None, None
