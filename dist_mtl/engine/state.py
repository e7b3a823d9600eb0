"""Model completeness and checkpoint state when heads live with the ranks that own their tasks.

`HeadShards` (exact protocols): every head's parameters sit in one flat tensor; making the model
complete for evaluation and checkpoints is one masked all-reduce over the task group (owners
contribute their heads, everyone else zeros). Optimizer state of a head exists only on its owners;
at checkpoint time rank 0 gathers the owned heads' state from its task group and writes one
checkpoint in the single-process format, so a run can resume on any layout, or on one process.
`ShardedState` (gramian with engine.shard_optimizer): the shared parameters' state is sliced over the
ranks too (`dist_mtl.engine.shard_optimizer`); saving gathers it over the world, loading slices it.
`ReplicatedState` (rep): every rank holds everything, so rank 0's own state is the checkpoint.
Both make BatchNorm running statistics consistent in `gather_model` (`dist_mtl.engine.sync_norm`):
with `model.norm=batch` they are averaged over the ranks that normalise disjoint slices of the
global batch (the replica group; the world for rep), so evaluation on every rank and the checkpoint
use the same statistics.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from dist_mtl.backend import full_state, load_full_state
from dist_mtl.balancers import Balancer
from dist_mtl.engine.comm import Comm
from dist_mtl.engine.layout import Layout
from dist_mtl.engine.protocols import Groups
from dist_mtl.engine.shard_optimizer import ShardedOptimizer
from dist_mtl.engine.sync_norm import average_running_stats
from dist_mtl.gradients import flatten_parameters
from dist_mtl.models import MultiTaskModel


class ReplicatedState:
    """State hooks of `rep`: every rank holds the whole model and optimizer state."""

    def __init__(
        self, model: MultiTaskModel, optimizer: torch.optim.Optimizer, balancer: Balancer, comm: Comm
    ) -> None:
        self.model, self.optimizer, self.balancer, self.comm = model, optimizer, balancer, comm

    def gather_model(self) -> None:
        """Every rank holds every parameter; batch-norm running statistics are averaged over the world."""
        average_running_stats(self.model)

    def state_dict(self) -> dict[str, Any]:
        return full_state(self.model, self.optimizer, self.balancer)

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        load_full_state(ckpt, self.model, self.optimizer, self.balancer)
        self.comm.step = ckpt["step"]


class HeadShards(ReplicatedState):
    """State hooks of the exact protocols: heads and their optimizer state live with their owners."""

    def __init__(
        self,
        model: MultiTaskModel,
        optimizer: torch.optim.Optimizer,
        balancer: Balancer,
        comm: Comm,
        layout: Layout,
        groups: Groups,
    ) -> None:
        super().__init__(model, optimizer, balancer, comm)
        self.groups = groups
        self.replica, k = layout.coords(comm.rank)
        owned = layout.tasks_of(k)
        tasks = range(model.num_tasks)
        heads = [p for t in tasks for p in model.head_parameters(t)]
        self.flat = flatten_parameters(heads)
        self.mask = torch.cat(
            [
                torch.full((p.numel(),), t in owned, dtype=torch.bool, device=self.flat.device)
                for t in tasks
                for p in model.head_parameters(t)
            ]
        )
        self.owned = [p for t in owned for p in model.head_parameters(t)]
        self.foreign = [p for t in tasks if t not in owned for p in model.head_parameters(t)]

    def gather_model(self) -> None:
        """Every rank of every task group gets the current value of every head; batch-norm running
        statistics are averaged over the replica group."""
        self.flat.masked_fill_(~self.mask, 0.0)
        self.comm.all_reduce(self.flat, self.groups.task)
        average_running_stats(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The full single-process checkpoint on rank 0 (an empty dict elsewhere)."""
        index = {p: i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        shared = self._shared_state(index)
        if self.replica != 0:
            return {}
        mine = {index[p]: _to_cpu(self.optimizer.state[p]) for p in self.owned if p in self.optimizer.state}
        parts = self.comm.gather_object(mine, self.groups.task, dst=0)
        if parts is None:
            return {}
        optimizer = self._optimizer_state_dict()
        merged = {**optimizer["state"], **shared}
        for part in parts:
            merged.update(part)
        optimizer["state"] = dict(sorted(merged.items()))
        return {
            "model": self.model.state_dict(),
            "optimizer": optimizer,
            "balancer": self.balancer.state_dict(),
        }

    def _shared_state(self, index: dict[torch.Tensor, int]) -> dict[int, dict[str, Any]]:
        """The shared parameters' state where the optimizer's own state_dict lacks it (every rank calls)."""
        return {}

    def _optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Load the full checkpoint, then drop the optimizer state of heads this rank does not own."""
        super().load_state_dict(ckpt)
        for p in self.foreign:
            self.optimizer.state.pop(p, None)


class ShardedState(HeadShards):
    """State hooks of `gramian` with engine.shard_optimizer: each rank's optimizer state holds its
    slice of the shared parameters (`ShardedOptimizer.mine`) and its heads. Saving gathers the slices
    over the world into every shared parameter's single-process state on rank 0; loading a
    single-process checkpoint keeps this rank's slice."""

    def __init__(
        self,
        model: MultiTaskModel,
        optimizer: torch.optim.Optimizer,
        balancer: Balancer,
        comm: Comm,
        layout: Layout,
        groups: Groups,
        shards: ShardedOptimizer,
    ) -> None:
        super().__init__(model, optimizer, balancer, comm, layout, groups)
        self.shards = shards

    def _shared_state(self, index: dict[torch.Tensor, int]) -> dict[int, dict[str, Any]]:
        return self.shards.gather_state(index)

    def _optimizer_state_dict(self) -> dict[str, Any]:
        """The trainer optimizer's state_dict format (param_groups, numbering) without its state, which
        is keyed by a tensor (`mine`) outside its groups; the caller fills the state in."""
        state = self.optimizer.state
        self.optimizer.state = defaultdict(dict)
        try:
            return self.optimizer.state_dict()
        finally:
            self.optimizer.state = state

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        super().load_state_dict(ckpt)
        self.shards.load_full()


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
