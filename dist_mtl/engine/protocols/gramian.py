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

Each task's round is further split in engine.overlap_chunks rounds along the shards (chunk c is the
c-th of the C equal parts of every shard), each launched during the task's own backward as soon as
every parameter it covers has its gradient (post-accumulate-grad hooks), last chunk first, the order
backward produces them; so after the last backward only its first chunk is still to go. The block is
then (T_k, C, K, s), the received rows (C, T, s), s = S / C, and the Gramian is the sum over chunks.

engine.wire_dtype=bfloat16: the shards travel as bfloat16 (half the all-to-all bytes) and the partial
Gramian is formed from them (upcast to float32); d is not formed from them but from the exact local
gradients: each rank forms sum over its tasks of c_t g_t (all of P) and a reduce-scatter leaves rank k
with shard k of the exact d, as the lossy codecs of `gather` do (DESIGN section 2).

engine.shard_optimizer (`dist_mtl.engine.shard_optimizer`, ZeRO-1): S is a multiple of D, shard k of d
is formed in place in the shared gradient buffer, and instead of the all-gather of d the optimizer
steps sub-shard r of shard k only and all-gathers the updated parameters (D = 1: the same bytes).
"""

from __future__ import annotations

import torch

from dist_mtl.engine.comm import Pending
from dist_mtl.engine.pipeline import Stage
from dist_mtl.engine.protocols.base import StepContext, solution_bytes
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.shard_optimizer import ShardedOptimizer, gather_bytes, shard_numel
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


def chunk_cover(sizes: list[int], k_size: int, shard: int, chunks: int) -> list[list[int]]:
    """For each parameter (flat sizes, in order), the chunks c whose ranges [j S + c s, j S + (c+1) s),
    j < K, s = S / C, hold part of it."""
    chunk, offset, cover = shard // chunks, 0, []
    for n in sizes:
        lo, hi, covered = offset, offset + n, set()
        for j in range(k_size):  # the part of the parameter in shard j, in chunks of that shard
            a, b = max(lo, j * shard), min(hi, (j + 1) * shard)
            if a < b:
                covered.update(range((a - j * shard) // chunk, (b - 1 - j * shard) // chunk + 1))
        cover.append(sorted(covered))
        offset = hi
    return cover


class GramianProtocol(TaskParallelProtocol):
    """Sharded Gramian: all-to-all of shards, reduce of T x T, broadcast of c, all-gather of d."""

    name = "gramian"
    overlaps = True

    def __init__(self, ctx: StepContext) -> None:
        # engine.shard_optimizer (Engine.make_step hands over a ShardedOptimizer): S a multiple of D,
        # d formed in place in the shared gradient buffer, and the optimizer gathers parameters, not d
        self.sharded = isinstance(ctx.optimizer, ShardedOptimizer)
        self.chunks = ctx.cfg.engine.overlap_chunks if ctx.cfg.engine.overlap else 1
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
        if self.sharded:  # shard k of d in place, where the optimizer's slice reads its gradient
            self.d_shard = self.block.direction[self.k * shard : (self.k + 1) * shard]
            self.optimizer.attach(self.block.direction)
        else:
            self.d_shard = self.block.direction if in_place else torch.zeros(shard, device=self.device)
        self.local_d = torch.zeros(k_size * shard, device=self.device) if self.lossy else None
        self.nothing = torch.zeros(0, dtype=self.wire_dtype, device=self.device)
        self.current: int | None = None  # the owned task whose backward is running (overlap)
        self.hooked = self.overlapping and self.chunks > 1
        if self.hooked:
            self._arm_hooks()

    def _arm_hooks(self) -> None:
        """A hook per shared parameter that launches a chunk's round once every parameter it covers
        has accumulated its gradient (within a task's backward only)."""
        sizes = [p.numel() for p in self.shared]
        self.chunks_of = chunk_cover(sizes, self.k_size, self.shard, self.chunks)
        self.waiting = [sum(c in cs for cs in self.chunks_of) for c in range(self.chunks)]
        self.seen = [-1] * len(self.shared)  # the task (stamp) whose gradient each parameter last had
        self.stamp = 0
        self.twice: list[int] = []
        self.early = 0  # chunk rounds launched this step before their task's last gradient arrived
        self.settled = 0
        for index, p in enumerate(self.shared):
            p.register_post_accumulate_grad_hook(lambda _p, index=index: self._on_gradient(index))

    @property
    def shard(self) -> int:
        """S = ceil(P / K) (a multiple of D with the sharded optimizer): the last shard is zero-padded."""
        return shard_numel(self.params, self.k_size, self.replicas, self.sharded, self.chunks)

    @property
    def chunk(self) -> int:
        """s = S / C: the elements of one shard in one chunk (overlap)."""
        return self.shard // self.chunks

    def block_numel(self) -> int:
        return self.t_max + self.k_size * self.mine * self.shard

    def direction_numel(self) -> int:
        return self.k_size * self.shard

    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """[losses (T_max) | grads]: grads (K, T_k, S), shard-major, so that one all-to-all needs no
        copy (task i's slot is column i of every shard), the shared gradient seen as (K, S) to match;
        with overlap (T_k, C, K, s), so that chunk c of task i's gradient, the round it sends, is one
        contiguous (K, s) row, and the shared gradient is seen as (C, K, s) to match."""
        mine, k_size, s, c_size = self.mine, self.k_size, self.shard, self.chunks
        if self.overlapping:
            grads = flat[self.t_max :].view(mine, c_size, k_size, s // c_size)
            slots = [grads[i] for i in range(mine)]
            source = direction.view(k_size, c_size, s // c_size).transpose(0, 1)
        else:
            grads = flat[self.t_max :].view(k_size, mine, s)
            slots = [grads[:, i] for i in range(mine)]
            source = direction.view(k_size, s)
        return TaskBlock(
            losses=flat[: self.t_max],
            grads=grads,
            filled=flat.numel(),
            slots=slots,
            direction=direction,
            source=source,
        )

    # --- overlap: chunk c of round i of the all-to-all, then its Gramian rows ---------------------

    def overlap_rest(self) -> torch.Tensor:
        return self.replica_part[: self.head_grad.buffer.numel() + self.t_max]

    def begin_task(self, i: int) -> None:
        if i == 0 and self.rows_gramian is not None:
            self.rows_gramian.zero_()
        if not self.hooked:
            return
        self.current, self.next_chunk = i, self.chunks - 1
        self.remaining = list(self.waiting)
        self.stamp += 1
        self.settled = 0
        self._launch_ready()

    def end_task(self, i: int) -> None:
        """Every chunk not launched yet (a parameter without a gradient never fires) goes now. A
        parameter used several times in the forward (tied weights) still accumulates once (autograd
        sums its uses first); one whose gradient arrived in several accumulations (a backward that
        re-enters, say) fails the step, since its chunk may have left with part of it."""
        if not self.overlapping:
            super().end_task(i)
            return
        if not self.hooked:  # one chunk: the task's round goes when its backward has ended
            self._start_chunk(i, 0)
            return
        self.remaining = [0] * self.chunks
        self._launch_ready()
        self.early += self.settled  # chunks that left before the task's last gradient arrived
        self.current = None
        if self.twice:
            raise RuntimeError(
                f"shared parameters {sorted(set(self.twice))} received their gradient in several "
                "accumulations within one task's backward, so engine.overlap_chunks cannot tell when "
                "they are complete; set engine.overlap_chunks=1 or engine.overlap=false"
            )

    def _on_gradient(self, index: int) -> None:
        if self.current is None:  # the one-backward path, evaluation tools: not a task's backward
            return
        self.settled = self.chunks - 1 - self.next_chunk  # chunks out before this gradient
        if self.seen[index] == self.stamp:
            self.twice.append(index)
        self.seen[index] = self.stamp
        for c in self.chunks_of[index]:
            self.remaining[c] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch chunks in the order C-1, ..., 0 (the same on every rank), each once it is complete."""
        assert self.current is not None
        while self.next_chunk >= 0 and self.remaining[self.next_chunk] <= 0:
            self._start_chunk(self.current, self.next_chunk)
            self.next_chunk -= 1

    def _start_chunk(self, i: int, c: int) -> None:
        row = self.block.grads[i, c]
        row.copy_(self.block.source[c])
        self.pipeline.start(self.replica_stages(row) + self._chunk_stages(i, c))

    def start_foreign_rounds(self) -> None:
        for i in range(self.mine, self.t_max):
            for c in reversed(range(self.chunks)):
                self.pipeline.start(self.replica_stages(None) + self._chunk_stages(i, c))

    def _chunk_stages(self, i: int, c: int) -> list[Stage]:
        if not self.needs_rows:
            return []
        return [lambda: self._start_all_to_all(i, c), lambda: self._accumulate(i, c)]

    def _rows(self, i: int) -> slice:
        """Rows of round i among the T received rows."""
        return slice(self.round_rows[i], self.round_rows[i + 1])

    def _start_all_to_all(self, i: int, c: int) -> Pending | None:
        mine, s = i < self.mine, self.chunk
        send = self.block.grads[i, c].view(-1) if mine else self.nothing
        if self.lossy and mine:
            assert self.wire is not None
            wire = self.wire.view(self.mine, self.chunks, -1)[i, c]
            wire.copy_(send)
            send = wire
        if self.k_size == 1:
            return None
        rows = self._rows(i)
        target = self.wire_received if self.lossy else self.received
        assert target is not None
        out = target.view(self.chunks, self.num_tasks, s)[c, rows].view(-1)
        in_splits = [s if mine else 0] * self.k_size
        out_splits = [s if i < n else 0 for n in self.split]
        return self.comm.start_all_to_all(out, send, out_splits, in_splits, self.groups.task)

    def _accumulate(self, i: int, c: int) -> None:
        """Chunk c of round i has arrived: upcast it (bfloat16 wire) and, on replica 0, add its Gramian
        rows against every row received so far (the lower triangle)."""
        t, s, rows = self.num_tasks, self.chunk, self._rows(i)
        if self.lossy:
            assert self.received is not None and self.wire is not None
            if self.k_size > 1:
                assert self.wire_received is not None
                source = self.wire_received.view(self.chunks, t, s)[c, rows]
            else:  # nothing travelled: this rank's own rounded rows
                source = self.wire.view(t, self.chunks, s)[rows, c]
            self.received.view(self.chunks, t, s)[c, rows].copy_(source)
        if self.rows_gramian is None:
            return
        assert self.rec is not None
        with self.rec.phase("solve"):
            chunk = self._chunk_rows(c)
            self.rows_gramian[rows, : rows.stop] += chunk[rows] @ chunk[: rows.stop].T

    def _chunk_rows(self, c: int) -> torch.Tensor:
        """(T, s): chunk c of every task's shard, rows in `order` (overlap)."""
        t, s = self.num_tasks, self.chunk
        if self.received is None:  # K = 1, float32: the block itself, (T, C, 1, s)
            return self.block.grads.view(t, self.chunks, s)[:, c]
        return self.received.view(self.chunks, t, s)[c]

    def _shards(self) -> torch.Tensor:
        """(T, S) received shards in task order (no overlap; the block itself with K = 1 and a float32
        wire)."""
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
            gramian, losses = self.partial[: t * t].view(t, t), self.partial[t * t :]
            with rec.phase("solve"):
                if self.rows_gramian is not None:  # lower triangle in round order -> symmetric, task order
                    m = self.rows_gramian
                    m.copy_(torch.tril(m) + torch.tril(m, -1).T)
                    torch.index_select(m.index_select(0, self.inverse), 1, self.inverse, out=gramian)
                else:
                    shards = self._shards()
                    torch.mm(shards, shards.T, out=gramian)
                losses.zero_()
                losses[self.owned.start : self.owned.stop] = b.losses[: self.mine]
            with rec.phase("exchange"):
                self.comm.reduce(self.partial, task, dst=0)
        solution, c = self.coordinator.solve(gramian, losses, rec)
        if self.hooked:  # how much of the exchange left while backward passes still ran
            solution.info["overlap/early_chunks"] = float(self.early)
            self.early = 0
        if solution.skipped:
            return solution
        with rec.phase("apply"):
            if self.lossy:
                self._exact_d_shard(c, rec)
            else:
                self._d_shard(c.to(self.d_shard.dtype)[self.order])
            if not self.sharded:  # sharded: the optimizer steps shard k and gathers the parameters
                with rec.phase("exchange"):
                    self.comm.all_gather(b.direction, self.d_shard, task)
        return solution

    def _d_shard(self, c: torch.Tensor) -> None:
        """Shard k of d = G c from the rows this rank holds (`c` in `order`)."""
        if not self.overlapping or self.received is None:  # (T, S) rows, or the (T, C, 1, s) block
            torch.mv(
                self.block.grads.view(self.num_tasks, -1).T if self.received is None else self._shards().T,
                c,
                out=self.d_shard,
            )
        else:  # (C, T, s) rows: one vector-matrix product per chunk
            torch.matmul(
                c,
                self.received.view(self.chunks, self.num_tasks, self.chunk),
                out=self.d_shard.view(self.chunks, self.chunk),
            )

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
        if self.overlapping:  # (T_k, C, K, s) -> (K, C, s)
            by_chunk = (own @ grads.view(self.mine, -1)).view(self.chunks, self.k_size, self.chunk)
            self.local_d.view(self.k_size, self.chunks, self.chunk).copy_(by_chunk.transpose(0, 1))
        else:  # (K, T_k, S): one batched vector-matrix product per shard, no copy of the block
            torch.matmul(own, grads, out=self.local_d.view(self.k_size, self.shard))
        with rec.phase("exchange"):
            self.comm.reduce_scatter(self.d_shard, self.local_d, self.groups.task)

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        t, k_size = shape.tasks, shape.k
        r, k = divmod(rank, k_size)
        chunks = shape.chunks if shape.overlap else 1
        shard = shard_numel(shape.params, k_size, shape.replicas, shape.sharded, chunks)
        mine = shape.split[k]
        wire = shape.wire
        send = [wire * mine * shard] * k_size
        recv = [wire * n * shard for n in shape.split]
        filled = max(shape.split) + k_size * mine * shard
        if shape.overlap and shape.replicas > 1:  # per-task rows, then [head grads | T_max losses]
            head = shape.head_params[k] if shape.head_params else 0
            replica = total(
                all_reduce_bytes(F32 * shape.split[k], shape.replicas),
                *[all_reduce_bytes(F32 * k_size * (shard // chunks), shape.replicas)] * (mine * chunks),
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
            gather_bytes(shape) if shape.sharded else all_gather_bytes(F32 * shard, k_size),
        )

    @classmethod
    def single_backward_bytes(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """The exact protocols' one-backward step; with the sharded optimizer, its parameter gathers."""
        base = super().single_backward_bytes(shape, rank)
        return total(base, gather_bytes(shape)) if shape.sharded else base
