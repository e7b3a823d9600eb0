"""Protocol `gramian`: the sharded Gramian, so that no rank ever holds T x P.

The flat shared gradient is split into K shards of S = ceil(P/K); an all-to-all leaves rank k with
shard k of every task gradient; its partial Gramian G_k^T G_k and the owned losses are reduced to
the coordinator in one T^2 + T buffer; the coordinator solves and broadcasts c; rank k forms shard k
of d = G c and an all-gather assembles d. Traffic about (T/K + 1)(K - 1)/K P floats each way per rank.
Only replica 0 forms and reduces the partial Gramians (the other replicas hold the same shards); with
K = 1 the rank's own block is every shard, so nothing is received or copied and d is formed in place.
"""

from __future__ import annotations

import torch

from dist_mtl.engine.protocols.base import StepContext, solution_bytes
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.traffic import F32, StepShape, all_gather_bytes, all_to_all_bytes, reduce_bytes, total
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution


class GramianProtocol(TaskParallelProtocol):
    """Sharded Gramian: all-to-all of shards, reduce of T x T, broadcast of c, all-gather of d."""

    name = "gramian"

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        t, shard = self.num_tasks, self.shard
        self.in_splits = [self.mine * shard] * self.k_size
        self.out_splits = [n * shard for n in self.split]
        alone = self.k_size == 1
        self.received = None if alone else torch.zeros(t * shard, device=self.device)
        # Partial Gramian and the owned losses (zeros elsewhere) travel in one reduce.
        self.partial = torch.zeros(t * t + t, device=self.device) if self.replica == 0 else None
        self.d_shard = self.block.direction if alone else torch.zeros(shard, device=self.device)

    @property
    def shard(self) -> int:
        """S = ceil(P / K): the last shard is zero-padded."""
        return -(-self.params // self.k_size)

    def block_numel(self) -> int:
        return self.t_max + self.k_size * self.mine * self.shard

    def direction_numel(self) -> int:
        return self.k_size * self.shard

    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """[losses (T_max) | grads (K, T_k, S)]: stored shard-major so the all-to-all needs no copy;
        task i's slot is column i of every shard, and the shared gradient is seen as (K, S) to match."""
        grads = flat[self.t_max :].view(self.k_size, self.mine, self.shard)
        return TaskBlock(
            losses=flat[: self.t_max],
            grads=grads,
            filled=flat.numel(),
            slots=[grads[:, i] for i in range(self.mine)],
            direction=direction,
            source=direction.view(self.k_size, self.shard),
        )

    def exchange(self, rec: StepRecorder) -> Solution:
        b, t, task = self.block, self.num_tasks, self.groups.task
        with rec.phase("exchange"):
            received = self.comm.all_to_all(
                self.received, b.grads.view(-1), self.out_splits, self.in_splits, task
            )
        shards = received.view(t, self.shard)
        gramian = losses = None
        if self.partial is not None:
            gramian, losses = self.partial[: t * t].view(t, t), self.partial[t * t :]
            with rec.phase("solve"):
                torch.mm(shards, shards.T, out=gramian)
                losses.zero_()
                losses[self.owned.start : self.owned.stop] = b.losses[: self.mine]
            with rec.phase("exchange"):
                self.comm.reduce(self.partial, task, dst=0)
        solution, c = self.coordinator.solve(gramian, losses, rec)
        if solution.skipped:
            return solution
        with rec.phase("apply"):
            torch.mv(shards.T, c.to(shards.dtype), out=self.d_shard)
            with rec.phase("exchange"):
                self.comm.all_gather(b.direction, self.d_shard, task)
        return solution

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        t, k_size = shape.tasks, shape.k
        r, k = divmod(rank, k_size)
        shard, mine = -(-shape.params // k_size), shape.split[k]
        send = [F32 * mine * shard] * k_size
        recv = [F32 * n * shard for n in shape.split]
        return total(
            cls.replica_bytes(shape, rank, max(shape.split) + k_size * mine * shard),
            all_to_all_bytes(send, recv, k),
            reduce_bytes(F32 * (t * t + t), k_size, k == 0) if r == 0 else (0, 0),
            solution_bytes(shape, rank),
            all_gather_bytes(F32 * shard, k_size),
        )
