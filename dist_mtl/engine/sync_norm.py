"""BatchNorm across ranks: which ranks share statistics, and keeping running statistics consistent.

The ranks that normalise disjoint slices of the global batch are the replica group for the exact
protocols (a task group sees one batch, its replicas disjoint slices of the global batch) and the
world for the rep-mode protocol `rep` (pure data parallelism). `attach_norm_sync` is called once per
step build and, by `model.norm`:

- `sync` (`SyncBatchNorm2d` layers): gives every layer the all-reduce over that group through `Comm`
  (bytes and seconds accounted to the step's open phase), so the forward and backward equal BatchNorm
  on the global batch and the running statistics are identical on every rank of the group; the
  replica checksum then also compares them, bit for bit, within each group. With a group of one rank
  (exact protocols with D = 1) there is nothing to reduce and the layers stay plain BatchNorm.
- `batch` (`nn.BatchNorm2d`): each replica keeps statistics of its own slices, which legitimately
  differ between replicas, so they are not checksummed; `average_running_stats` (called by the state
  hooks' `gather_model`, before every evaluation and checkpoint) replaces them by their average over
  the group in one all-reduce of every running mean and variance flattened together. Running
  statistics are exponential averages, linear in the batch statistics, so averaging at those points
  equals averaging once at the end. `num_batches_tracked` is the same on every rank and stays as is.
- `group` (GroupNorm): no statistics, nothing to do.
"""

from __future__ import annotations

from functools import partial
from weakref import WeakKeyDictionary

import torch
from torch import nn

from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.protocols import Groups, protocol_class
from dist_mtl.gradients import flatten_parameters
from dist_mtl.models.norm import SyncBatchNorm2d

_ATTACHED: WeakKeyDictionary[nn.Module, NormSync] = WeakKeyDictionary()


class NormSync:
    """The BatchNorm layers of one model, the group that shares their statistics, their flat buffers."""

    def __init__(self, layers: list[nn.modules.batchnorm._BatchNorm], comm: Comm, group: Group) -> None:
        self.layers, self.comm, self.group = layers, comm, group
        self.synced = all(isinstance(m, SyncBatchNorm2d) for m in layers)
        stats = [b for m in layers for b in (m.running_mean, m.running_var) if b is not None]
        # One flat tensor backs every running mean and variance (each buffer becomes a view, as
        # `flatten_parameters` does for parameters): one collective or checksum covers them all, and
        # the in-place updates of BatchNorm and load_state_dict keep writing into it.
        self.flat = flatten_parameters(stats)
        self.counters = [m.num_batches_tracked for m in layers if m.num_batches_tracked is not None]

    def average_running_stats(self) -> None:
        """Batch norm: running statistics averaged over the group (already identical with sync norm)."""
        if self.synced or self.group.size == 1 or self.flat.numel() == 0:
            return
        self.comm.all_reduce(self.flat, self.group)
        self.flat.div_(self.group.size)

    def checksum_terms(self) -> torch.Tensor:
        """(sum, sum of squares) of the running statistics in float64, plus the batch counters' sum."""
        total = self.flat.sum(dtype=torch.float64)
        if self.counters:
            total = total + torch.stack(self.counters).sum().to(torch.float64)
        return torch.stack([total, self.flat.square().sum(dtype=torch.float64)])


def attach_norm_sync(
    model: nn.Module, protocol: str, groups: Groups, comm: Comm, checksum: ReplicaChecksum
) -> NormSync | None:
    """Wire `model`'s BatchNorm layers to the group that shares their statistics (None: there are none).

    Sync layers get the group's all-reduce and their running statistics are added to `checksum`
    (compared within each group); the returned object (also found by `norm_sync_of(model)`) averages
    batch-norm running statistics for `gather_model`.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return None
    # rep mode is pure data parallelism over the world; exact protocols share a batch per task group.
    group = groups.world if protocol_class(protocol).mode == "rep" else groups.replica
    if group.size > 1:
        for m in layers:
            if isinstance(m, SyncBatchNorm2d):
                m.all_reduce = partial(comm.all_reduce, group=group)
    sync = NormSync(layers, comm, group)
    if sync.synced and group.size > 1:
        checksum.watch_buffers(sync.checksum_terms, group)
    _ATTACHED[model] = sync
    return sync


def norm_sync_of(model: nn.Module) -> NormSync | None:
    return _ATTACHED.get(model)


def average_running_stats(model: nn.Module) -> None:
    """What `gather_model` does for norm layers: average batch-norm running statistics over the group."""
    sync = norm_sync_of(model)
    if sync is not None:
        sync.average_running_stats()
