"""The exact protocols: how a task group turns its owned task gradients into the direction d.

Both start from a rank's `TaskBlock` (owned losses and task gradients, already averaged over the
replica group) and end with d in the rank's shared gradient buffer, unless the step is skipped.

- `GramianExchange`: all-to-all so rank k holds shard k of every task gradient, partial Gramians
  reduced to the coordinator, T coefficients broadcast, shard k of d formed locally, all-gather.
- `GatherExchange`: payloads (losses and raw or compressed rows) gathered on the coordinator, which
  forms the Gramian and solves. Lossless: the coordinator also forms d and broadcasts it. Lossy
  (and protocol `sketch`, which is gather with the count-sketch codec): c is broadcast and d is the
  all-reduce of sum over owned t of c_t g_t, from exact local gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mtl.engine.codecs import Codec
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.coordinator import Coordinator
from dist_mtl.engine.layout import Layout
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution


@dataclass
class TaskBlock:
    """One rank's per-step exchange state, views into buffers allocated once."""

    losses: torch.Tensor  # (T_max,) owned losses, zero beyond the rank's own tasks
    grads: torch.Tensor  # owned task gradients in the protocol's layout (`block_shape`), zero-padded
    payload: torch.Tensor  # [losses, grads] as one contiguous flat view
    direction: torch.Tensor  # (width,) the shared gradient buffer; its first P entries are the .grad views
    slots: list[torch.Tensor]  # slots[i]: the view of `grads` that receives owned task i's gradient
    source: torch.Tensor  # `direction` viewed like a slot: after task i's backward, copied into slots[i]


@dataclass(frozen=True)
class Groups:
    world: Group
    task: Group
    replica: Group


class GramianExchange:
    """Sharded Gramian: traffic about (T/K + 1)(K - 1)/K P floats each way per rank."""

    def __init__(
        self,
        layout: Layout,
        rank: int,
        comm: Comm,
        groups: Groups,
        coordinator: Coordinator,
        block: TaskBlock,
        params: int,
    ) -> None:
        self.comm, self.groups, self.coordinator, self.block = comm, groups, coordinator, block
        self.replica, self.k = layout.coords(rank)
        k_size, t = layout.task_parallel, layout.num_tasks
        self.mine = layout.split[self.k]
        self.shard = shard_width(params, k_size)
        device = block.grads.device
        self.in_splits = [self.mine * self.shard] * k_size
        self.out_splits = [n * self.shard for n in layout.split]
        self.received = torch.zeros(t * self.shard, device=device)
        # Partial Gramian and the owned losses (zeros elsewhere) travel in one reduce.
        self.partial = torch.zeros(t * t + t, device=device)
        self.owned = layout.tasks_of(self.k)
        self.num_tasks = t
        self.d_shard = torch.zeros(self.shard, device=device)

    @staticmethod
    def block_shape(layout: Layout, k: int, params: int) -> tuple[int, ...]:
        """(K, T_k, S): P padded to K shards of S, stored shard-major so the all-to-all needs no copy."""
        return layout.task_parallel, layout.split[k], shard_width(params, layout.task_parallel)

    @staticmethod
    def views(grads: torch.Tensor, direction: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Task i's slot is column i of every shard; the shared gradient is seen as (K, S) to match."""
        return [grads[:, i] for i in range(grads.shape[1])], direction.view(grads.shape[0], grads.shape[2])

    def __call__(self, rec: StepRecorder) -> Solution:
        b, t, task = self.block, self.num_tasks, self.groups.task
        with rec.phase("exchange"):
            self.comm.all_to_all(self.received, b.grads.view(-1), self.out_splits, self.in_splits, task)
        shards = self.received.view(t, self.shard)
        with rec.phase("solve"):
            torch.mm(shards, shards.T, out=self.partial[: t * t].view(t, t))
            losses = self.partial[t * t :]
            losses.zero_()
            losses[self.owned.start : self.owned.stop] = b.losses[: self.mine]
        if self.replica == 0:
            with rec.phase("exchange"):
                self.comm.reduce(self.partial, task, dst=0)
        solution, c = self.coordinator.solve(self.partial[: t * t].view(t, t), self.partial[t * t :], rec)
        if solution.skipped:
            return solution
        with rec.phase("apply"):
            torch.mv(shards.T, c.to(shards.dtype), out=self.d_shard)
            with rec.phase("exchange"):
                self.comm.all_gather(b.direction, self.d_shard, task)
        return solution


class GatherExchange:
    """Payloads gathered on the coordinator; lossless d broadcast, lossy d all-reduced from exact rows."""

    def __init__(
        self,
        layout: Layout,
        rank: int,
        comm: Comm,
        groups: Groups,
        coordinator: Coordinator,
        block: TaskBlock,
        params: int,
        codec: Codec,
    ) -> None:
        self.comm, self.groups, self.coordinator, self.block = comm, groups, coordinator, block
        self.codec = codec
        self.replica, self.k = layout.coords(rank)
        self.rows = layout.max_tasks
        self.mine = layout.split[self.k]
        self.owned = layout.tasks_of(self.k)
        self.is_root = coordinator.is_coordinator
        device = block.grads.device
        k_size = layout.task_parallel
        width = codec.numel(self.rows, params)
        self.received = torch.zeros(k_size, width, dtype=codec.dtype, device=device) if self.is_root else None
        # Rows of real tasks among the K * T_max gathered rows (the rest is padding).
        self.index = torch.tensor(
            [j * self.rows + i for j in range(k_size) for i in range(layout.split[j])], device=device
        )
        self.padded_c = torch.zeros(k_size * self.rows, device=device)

    @staticmethod
    def block_shape(layout: Layout, k: int, params: int) -> tuple[int, ...]:
        """(T_max, P): every rank pads to T_max rows so the gathered payloads are equal in size."""
        return layout.max_tasks, params

    @staticmethod
    def views(grads: torch.Tensor, direction: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Task i's slot is row i."""
        return list(grads.unbind(0)), direction

    def __call__(self, rec: StepRecorder) -> Solution:
        b = self.block
        gramian = losses = rows = None
        if self.replica == 0:
            with rec.phase("exchange"):
                wire = self.codec.encode(b.losses, b.grads, b.payload)
                self.comm.gather(wire, self.received, self.groups.task, dst=0)
        if self.received is not None:
            with rec.phase("solve"):
                if self.codec.lossless:
                    padded_losses, rows = self.codec.decode(self.received, self.rows)
                    padded = rows @ rows.T
                else:
                    padded, padded_losses = self.codec.gramian(self.received, self.rows)
                gramian = padded.index_select(0, self.index).index_select(1, self.index)
                losses = padded_losses.index_select(0, self.index)
        solution, c = self.coordinator.solve(gramian, losses, rec)
        if solution.skipped:
            return solution
        with rec.phase("apply"):
            if self.codec.lossless:
                if rows is not None:
                    self.padded_c.index_copy_(0, self.index, c.to(self.padded_c.dtype))
                    torch.mv(rows.T, self.padded_c, out=b.direction)
                with rec.phase("exchange"):
                    self.comm.broadcast(b.direction, self.groups.world, src=0)
            else:
                own = c[self.owned.start : self.owned.stop].to(b.grads.dtype)
                torch.mv(b.grads[: self.mine].T, own, out=b.direction)
                with rec.phase("exchange"):
                    self.comm.all_reduce(b.direction, self.groups.task)
        return solution


def shard_width(params: int, parts: int) -> int:
    return -(-params // parts)
