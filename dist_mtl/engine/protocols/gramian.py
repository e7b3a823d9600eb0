"""Protocol `gramian`: the sharded Gramian, so that no rank ever holds T x P.

The flat shared gradient is split into K shards of S = ceil(P/K); an all-to-all leaves rank k with
shard k of every task gradient; its partial Gramian G_k^T G_k and the owned losses are reduced to
the coordinator in one T^2 + T buffer; the coordinator solves and broadcasts c; rank k forms shard k
of d = G c and an all-gather assembles d. Traffic about (T/K + 1)(K - 1)/K P floats each way per rank.
Only replica 0 forms and reduces the partial Gramians (the other replicas hold the same shards); with
K = 1 the rank's own block is every shard, so nothing is received or copied and d is formed in place.

engine.overlap: the all-to-all runs in T_max rounds, round i carrying the i-th owned task of every
rank, launched as soon as that task's backward ends (rounds past a rank's own tasks carry nothing
from it), so the exchange runs under the next task's backward; with D > 1 each task's replica
all-reduce runs first in its chain. The block is then task-major (task i's K shards contiguous), the
received rows are in round order (`order`: the task of each row), and the partial Gramian is
accumulated a round at a time as the rows arrive: round i's rows against every row received so far
(the lower triangle), mirrored once at the end and put back into task order (a T x T gather).

engine.wire_dtype=bfloat16: the shards travel as bfloat16 (half the all-to-all bytes) and the partial
Gramian is formed from them (upcast to float32); d is not formed from them but from the exact local
gradients: each rank forms sum over its tasks of c_t g_t (all of P) and a reduce-scatter leaves rank k
with shard k of the exact d, as the lossy codecs of `gather` do (DESIGN section 2).
"""

from __future__ import annotations

import torch

from dist_mtl.engine.comm import Pending
from dist_mtl.engine.pipeline import Stage
from dist_mtl.engine.protocols.base import StepContext, solution_bytes
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.traffic import (
    F32,
    StepShape,
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    reduce_bytes,
    reduce_scatter_bytes,
    total,
)
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class GramianProtocol(TaskParallelProtocol):
    """Sharded Gramian: all-to-all of shards, reduce of T x T, broadcast of c, all-gather of d."""

    name = "gramian"
    overlaps = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        t, shard, k_size = self.num_tasks, self.shard, self.k_size
        self.wire_dtype = WIRE_DTYPES[ctx.cfg.engine.wire_dtype]
        self.lossy = self.wire_dtype != torch.float32
        self.in_splits = [self.mine * shard] * k_size
        self.out_splits = [n * shard for n in self.split]
        alone = k_size == 1
        # bfloat16 wire: d comes from exact local gradients, so only replica 0 (which forms the
        # Gramian) needs the rows; the other replicas' task groups skip the all-to-all.
        self.needs_rows = not self.lossy or self.replica == 0
        starts = [sum(self.split[:j]) for j in range(k_size)]
        if self.overlapping:  # rows in round order: round i holds the i-th task of every rank that has one
            order = [starts[j] + i for i in range(self.t_max) for j in range(k_size) if i < self.split[j]]
        else:
            order = list(range(t))
        self.round_rows = [sum(min(n, i) for n in self.split) for i in range(self.t_max + 1)]
        self.order = torch.tensor(order, device=self.device)
        self.inverse = torch.argsort(self.order)
        # Received shards (T, S) in `order`; float32 (bfloat16 rows are upcast into it). K = 1 with a
        # float32 wire: the block itself.
        self.received = None
        if self.needs_rows and not (alone and not self.lossy):
            self.received = torch.zeros(t * shard, device=self.device)
        self.wire = self.wire_received = None
        if self.lossy and self.needs_rows:
            self.wire = torch.zeros(self.block.grads.numel(), dtype=self.wire_dtype, device=self.device)
            self.wire_received = torch.zeros(t * shard, dtype=self.wire_dtype, device=self.device)
        # Partial Gramian and the owned losses (zeros elsewhere) travel in one reduce.
        self.partial = torch.zeros(t * t + t, device=self.device) if self.replica == 0 else None
        self.rows_gramian = None
        if self.overlapping and self.partial is not None:
            self.rows_gramian = torch.zeros(t, t, device=self.device)
        in_place = alone and not self.lossy
        self.d_shard = self.block.direction if in_place else torch.zeros(shard, device=self.device)
        self.local_d = torch.zeros(k_size * shard, device=self.device) if self.lossy else None
        self.nothing = torch.zeros(0, dtype=self.wire_dtype, device=self.device)

    @property
    def shard(self) -> int:
        """S = ceil(P / K): the last shard is zero-padded."""
        return -(-self.params // self.k_size)

    def block_numel(self) -> int:
        return self.t_max + self.k_size * self.mine * self.shard

    def direction_numel(self) -> int:
        return self.k_size * self.shard

    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """[losses (T_max) | grads]: grads (K, T_k, S), shard-major, so that one all-to-all needs no
        copy (task i's slot is column i of every shard); with overlap (T_k, K, S), task-major, so that
        task i's round sends one contiguous row. The shared gradient is seen as (K, S) to match."""
        mine, k_size, s = self.mine, self.k_size, self.shard
        grads = flat[self.t_max :].view((mine, k_size, s) if self.overlapping else (k_size, mine, s))
        slots = [grads[i] if self.overlapping else grads[:, i] for i in range(self.mine)]
        return TaskBlock(
            losses=flat[: self.t_max],
            grads=grads,
            filled=flat.numel(),
            slots=slots,
            direction=direction,
            source=direction.view(self.k_size, self.shard),
        )

    # --- overlap: round i of the all-to-all, then round i's Gramian rows ---------------------------

    def task_row(self, i: int) -> torch.Tensor:
        return self.block.grads[i]

    def overlap_rest(self) -> torch.Tensor:
        return self.replica_part[: self.head_grad.buffer.numel() + self.t_max]

    def task_stages(self, i: int) -> list[Stage]:
        if not self.needs_rows:
            return []
        return [lambda: self._start_all_to_all(i), lambda: self._accumulate(i)]

    def _round(self, i: int) -> slice:
        """Elements of round i's rows in the received buffers."""
        return slice(self.round_rows[i] * self.shard, self.round_rows[i + 1] * self.shard)

    def _start_all_to_all(self, i: int) -> Pending | None:
        mine, s = i < self.mine, self.shard
        send = self.block.grads[i].view(-1) if mine else self.nothing
        if self.lossy and mine:
            wire = self.wire[i * self.k_size * s : (i + 1) * self.k_size * s]
            wire.copy_(send)
            send = wire
        if self.k_size == 1:
            return None
        out = (self.wire_received if self.lossy else self.received)[self._round(i)]
        in_splits = [s if mine else 0] * self.k_size
        out_splits = [s if i < n else 0 for n in self.split]
        return self.comm.start_all_to_all(out, send, out_splits, in_splits, self.groups.task)

    def _accumulate(self, i: int) -> None:
        """Round i's rows have arrived: upcast them (bfloat16 wire) and, on replica 0, their Gramian
        rows against every row so far."""
        rows = self._round(i)
        if self.lossy:
            assert self.received is not None and self.wire is not None
            source = self.wire_received if self.k_size > 1 else self.wire
            self.received[rows].copy_(source[rows])
        if self.rows_gramian is None or self.partial is None:
            return
        assert self.rec is not None
        with self.rec.phase("solve"):
            shards = self._shards()
            lo, hi = self.round_rows[i], self.round_rows[i + 1]
            self.rows_gramian[lo:hi, :hi] = shards[lo:hi] @ shards[:hi].T

    def _shards(self) -> torch.Tensor:
        """(T, S) received shards in `order` (the block itself with K = 1 and a float32 wire)."""
        source = self.block.grads if self.received is None else self.received
        return source.view(self.num_tasks, self.shard)

    # --- the exchange -----------------------------------------------------------------------------

    def exchange(self, rec: StepRecorder) -> Solution:
        b, t, task = self.block, self.num_tasks, self.groups.task
        if self.overlapping:
            self.finish_overlap(rec)
        elif self.needs_rows:
            self._exchange_at_once(rec)
        gramian = losses = None
        if self.partial is not None:
            shards = self._shards()
            gramian, losses = self.partial[: t * t].view(t, t), self.partial[t * t :]
            with rec.phase("solve"):
                if self.rows_gramian is not None:  # lower triangle in round order -> symmetric, task order
                    m = self.rows_gramian
                    m.copy_(torch.tril(m) + torch.tril(m, -1).T)
                    torch.index_select(m.index_select(0, self.inverse), 1, self.inverse, out=gramian)
                else:
                    torch.mm(shards, shards.T, out=gramian)
                losses.zero_()
                losses[self.owned.start : self.owned.stop] = b.losses[: self.mine]
            with rec.phase("exchange"):
                self.comm.reduce(self.partial, task, dst=0)
        solution, c = self.coordinator.solve(gramian, losses, rec)
        if solution.skipped:
            return solution
        with rec.phase("apply"):
            if self.lossy:
                self._exact_d_shard(c, rec)
            else:
                shards = self._shards()
                torch.mv(shards.T, c.to(shards.dtype)[self.order], out=self.d_shard)
            with rec.phase("exchange"):
                self.comm.all_gather(b.direction, self.d_shard, task)
        return solution

    def _exchange_at_once(self, rec: StepRecorder) -> None:
        """No overlap: one all-to-all of the whole block after the last backward."""
        b = self.block
        send = b.grads.view(-1)
        if self.lossy:
            assert self.wire is not None and self.received is not None
            self.wire.copy_(send)
            send = self.wire
        with rec.phase("exchange"):
            received = self.comm.all_to_all(
                self.wire_received if self.lossy else self.received,
                send,
                self.out_splits,
                self.in_splits,
                self.groups.task,
            )
        if self.lossy:
            self.received.copy_(received)

    def _exact_d_shard(self, c: torch.Tensor, rec: StepRecorder) -> None:
        """bfloat16 wire: d from the exact local gradients, sum over owned t of c_t g_t (all of P),
        reduce-scattered so that rank k holds shard k of d."""
        assert self.local_d is not None
        own = c.to(self.local_d.dtype)[self.owned.start : self.owned.stop]
        grads = self.block.grads
        if self.overlapping:  # (T_k, K, S)
            torch.mv(grads.view(self.mine, -1).T, own, out=self.local_d)
        else:  # (K, T_k, S): one batched vector-matrix product per shard, no copy of the block
            torch.matmul(own, grads, out=self.local_d.view(self.k_size, self.shard))
        with rec.phase("exchange"):
            self.comm.reduce_scatter(self.d_shard, self.local_d, self.groups.task)

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        t, k_size = shape.tasks, shape.k
        r, k = divmod(rank, k_size)
        shard, mine = -(-shape.params // k_size), shape.split[k]
        wire = shape.wire
        send = [wire * mine * shard] * k_size
        recv = [wire * n * shard for n in shape.split]
        filled = max(shape.split) + k_size * mine * shard
        if shape.overlap and shape.replicas > 1:  # per-task rows, then [head grads | T_max losses]
            head = shape.head_params[k] if shape.head_params else 0
            replica = total(
                all_reduce_bytes(F32 * shape.split[k], shape.replicas),
                *[all_reduce_bytes(F32 * k_size * shard, shape.replicas)] * mine,
                all_reduce_bytes(F32 * (head + max(shape.split)), shape.replicas),
            )
        else:
            replica = cls.replica_bytes(shape, rank, filled)
        lossy = wire != F32
        lossy_d = reduce_scatter_bytes(F32 * k_size * shard, k_size) if lossy and k_size > 1 else (0, 0)
        rows = all_to_all_bytes(send, recv, k) if not lossy or r == 0 else (0, 0)
        return total(
            replica,
            rows,  # rounds split it, and the sum is the same
            reduce_bytes(F32 * (t * t + t), k_size, k == 0) if r == 0 else (0, 0),
            solution_bytes(shape, rank),
            lossy_d,
            all_gather_bytes(F32 * shard, k_size),
        )
