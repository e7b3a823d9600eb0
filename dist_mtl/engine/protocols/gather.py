"""Protocols `gather` and `sketch`: every task group's payloads gathered on the coordinator.

Each rank of replica 0 sends its T_max rows [code(g_t) | L_t] (see `codecs`); the coordinator forms
the Gramian of the K * T_max gathered rows and solves. Lossless (`gather` without compression): the
coordinator also forms d = G c from the rows it holds and broadcasts it. Lossy (`gather` with
engine.compression, and `sketch`, which is gather with the count-sketch codec): c is broadcast and d
is the all-reduce of sum over owned t of c_t g_t, formed from exact local gradients (DESIGN section 2).

The rank's block is (T_max, P + 1) rows [g_t | L_t], so lossless `gather` sends it as it is. The
coordinator's block is the first of the K blocks it gathers (the others are received right after it,
in the same buffer), and G, the losses and d = G c are views of that buffer: beyond the
K x T_max x (P + 1) floats of the gathered rows it holds nothing of size P but d. With K = 1 nothing
is received: the block it holds is the whole payload.

engine.overlap: the gather runs in T_max rounds, round i carrying the i-th owned task's row of every
rank that has one (encoded first by the lossy codecs), sent point to point as soon as that task's
backward ends, so it moves under the next task's backward (ranks send only their real rows, no
padding). The coordinator posts every round's receives after its first backward, straight into its
one buffer of K * T_max rows, now round-major (round i's K rows contiguous, its own row first: its
block is every K-th row), and forms the Gramian a round at a time: round i's rows against every row
received so far (the lower triangle: about half the full product's flops; measured 0.7x its time for
T = 8, P = 3M on one CPU thread). gloo reports a point-to-point receive complete only once it is
waited, so on CPU the rounds are formed after the last backward, each while the later rounds are
still arriving (the transfers themselves run during the backward); a backend whose receives report
completion (NCCL) forms them between backward passes. The losses travel in the rows (the block holds
them before the first backward), so with D > 1 each task's replica all-reduce is its row, and the
owned heads' gradients are all-reduced after the last backward. The broadcast (lossless) or
all-reduce (lossy) of d needs c, so it stays after the solve.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dist_mtl.engine.codecs import build_codec, payload_bytes, row_bytes
from dist_mtl.engine.comm import Pending
from dist_mtl.engine.pipeline import Stage
from dist_mtl.engine.protocols.base import StepContext, solution_bytes
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.traffic import F32, StepShape, all_reduce_bytes, broadcast_bytes, gather_bytes, total
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution


class GatherProtocol(TaskParallelProtocol):
    """Payloads gathered on the coordinator; lossless d broadcast, lossy d all-reduced from exact rows."""

    name = "gather"
    codec_name: ClassVar[str | None] = None  # None: engine.compression
    overlaps = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        e = ctx.cfg.engine
        self.codec = build_codec(
            self.compression(e.compression),
            params=self.params,
            topk_ratio=e.topk_ratio,
            sketch_size=e.sketch_size,
            sketch_seed=e.sketch_seed,
            device=self.device,
        )
        k_size, t_max = self.k_size, self.t_max
        lossy = not self.codec.lossless
        # Lossy codes: a buffer of their own on the coordinator (overlap: also with K = 1, where the
        # rounds encode into it; today's path then encodes the block in one temporary of that size).
        if self.gathered is None and self.is_root and lossy and (k_size > 1 or self.overlapping):
            self.gathered = torch.zeros(
                (k_size * t_max, self.codec.width), dtype=self.codec.dtype, device=self.device
            )
        # Row of each task among the K * T_max gathered rows (the rest is padding): rank j's i-th task
        # is row j * T_max + i, or i * K + j when the rounds make the buffer round-major.
        self.index = torch.tensor(
            [
                i * k_size + j if self.overlapping else j * t_max + i
                for j in range(k_size)
                for i in range(self.split[j])
            ],
            device=self.device,
        )
        self.padded_c = torch.zeros(k_size * t_max, device=self.device)
        # Overlap: the sender's encoded rows (lossy; they live until their send is waited), the
        # coordinator's receives per round and its Gramian of the rows in buffer order.
        self.wire = None
        if self.overlapping and lossy and self.replica == 0 and not self.is_root:
            self.wire = torch.zeros((t_max, self.codec.width), dtype=self.codec.dtype, device=self.device)
        self.receives: list[Pending | None] = [None] * t_max
        self.rows_gramian = None
        if self.overlapping and self.is_root:
            self.rows_gramian = torch.zeros(k_size * t_max, k_size * t_max, device=self.device)

    @classmethod
    def compression(cls, configured: str) -> str:
        """The codec this protocol runs: its own (`sketch`) or engine.compression."""
        return cls.codec_name or configured

    @property
    def is_root(self) -> bool:
        return self.coordinator.is_coordinator

    @property
    def gathers_in_place(self) -> bool:
        """Lossless on the coordinator of K > 1: the other ranks' rows are received after its own."""
        lossless = self.compression(self.engine_cfg.compression) == "none"
        return lossless and self.is_root and self.k_size > 1

    def block_numel(self) -> int:
        return self.t_max * (self.params + 1)

    def tail_numel(self) -> int:
        return (self.k_size - 1) * self.block_numel() if self.gathers_in_place else 0

    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """(T_max, P + 1) rows [g_t | L_t]: every rank pads to T_max rows so the gathered payloads are
        equal in size; task i's slot is the gradient part of row i. Overlap, on the coordinator of
        K > 1: its rows are every K-th of the round-major gathered rows."""
        gathered = flat.view(-1, self.params + 1)
        self.gathered = gathered if self.gathers_in_place else None
        if self.gathers_in_place and self.overlapping:
            self.rows = gathered.view(self.t_max, self.k_size, self.params + 1)[:, 0]
        else:
            self.rows = gathered[: self.t_max]
        grads = self.rows[:, :-1]
        return TaskBlock(
            losses=self.rows[:, -1],
            grads=grads,
            filled=self.mine * (self.params + 1),
            slots=list(grads.unbind(0)),
            direction=direction,
            source=direction,
        )

    # --- overlap: round i sends every rank's i-th row to the coordinator --------------------------

    def task_row(self, i: int) -> torch.Tensor:
        return self.rows[i]  # [g_i | L_i]: the loss is in place before the first backward

    def overlap_rest(self) -> torch.Tensor:
        return self.head_grad.buffer

    def task_stages(self, i: int) -> list[Stage]:
        if self.replica != 0:  # only replica 0 gathers (the others hold the same rows after the replica sum)
            return []
        if self.is_root:
            if i == 0:
                self._post_receives()
            return [lambda: self._own_row(i), lambda: self._accumulate(i)]
        return [lambda: self._send(i)] if i < self.mine else []

    def _wire_rows(self) -> torch.Tensor:
        """The coordinator's K * T_max rows in round order (its block itself with K = 1, lossless)."""
        return self.rows if self.gathered is None else self.gathered

    def _post_receives(self) -> None:
        """Every round's receives, posted at once so that each transfer starts as soon as its sender
        is ready; round i uses tag i."""
        if self.k_size == 1:
            return
        rows = self._wire_rows()
        for i in range(self.t_max):
            outs = [(j, rows[i * self.k_size + j]) for j in range(1, self.k_size) if i < self.split[j]]
            self.receives[i] = self.comm.start_receive(outs, self.groups.task, tag=i)

    def _own_row(self, i: int) -> Pending | None:
        """The coordinator's round i: encode its own row into the gathered codes (lossy), then wait
        for the round's receives."""
        if not self.codec.lossless and i < self.mine:
            assert self.rec is not None and self.gathered is not None
            with self.rec.phase("exchange"):
                row = i * self.k_size
                self.codec.encode(self.rows[i : i + 1], out=self.gathered[row : row + 1])
        pending, self.receives[i] = self.receives[i], None
        return pending

    def _send(self, i: int) -> Pending:
        row = self.rows[i]
        if self.wire is not None:
            assert self.rec is not None
            with self.rec.phase("exchange"):
                row = self.codec.encode(self.rows[i : i + 1], out=self.wire[i : i + 1])[0]
        return self.comm.start_send(row, self.groups.task, dst=0, tag=i)

    def _accumulate(self, i: int) -> None:
        """Round i's rows have arrived: their Gramian rows against every row so far."""
        assert self.rec is not None and self.rows_gramian is not None
        with self.rec.phase("solve"):
            k = self.k_size
            self.codec.gramian_rows(self._wire_rows(), i * k, (i + 1) * k, self.rows_gramian)

    # --- the exchange -----------------------------------------------------------------------------

    def exchange(self, rec: StepRecorder) -> Solution:
        b = self.block
        gramian = losses = rows = None
        if self.overlapping:
            self.finish_overlap(rec)
            if self.rows_gramian is not None:  # the coordinator
                with rec.phase("solve"):
                    wire = self._wire_rows()
                    m = self.rows_gramian  # lower triangle -> symmetric, then task order
                    m.copy_(torch.tril(m) + torch.tril(m, -1).T)
                    gramian = m.index_select(0, self.index).index_select(1, self.index)
                    losses = self.codec.losses(wire).index_select(0, self.index)
                    if self.codec.lossless:
                        rows = wire[:, :-1]
        elif self.replica == 0:
            with rec.phase("exchange"):
                # The encoded rows live only through the gather (the coordinator keeps its copy).
                received = self.comm.gather(
                    self.codec.encode(self.rows), self.gathered, self.groups.task, dst=0
                )
            if received is not None:  # the coordinator
                with rec.phase("solve"):
                    gathered = received.view(self.k_size * self.t_max, self.codec.width)
                    padded, padded_losses = self.codec.gramian(gathered)
                    if self.codec.lossless:
                        rows = gathered[:, :-1]  # the gathered gradients, a view
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

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        r, k = divmod(rank, shape.k)
        world, mine = shape.replicas * shape.k, shape.split[k]
        compression = cls.compression(shape.compression)
        direction = (
            broadcast_bytes(F32 * shape.params, world, rank)
            if compression == "none"
            else all_reduce_bytes(F32 * shape.params, shape.k)
        )
        if not shape.overlap:
            replica = cls.replica_bytes(shape, rank, mine * (shape.params + 1))
            rows = gather_bytes(payload_bytes(compression, shape), shape.k, k == 0) if r == 0 else (0, 0)
        else:  # one send per real row (no padding); with D > 1 an all-reduce per row, then the heads
            row = row_bytes(compression, shape)
            rows = (0, 0)
            if r == 0 and shape.k > 1:
                rows = (0, row * (shape.tasks - shape.split[0])) if k == 0 else (row * mine, 0)
            replica = (0, 0)
            if shape.replicas > 1:
                head = shape.head_params[k] if shape.head_params else 0
                replica = total(
                    all_reduce_bytes(F32 * mine, shape.replicas),
                    *[all_reduce_bytes(F32 * (shape.params + 1), shape.replicas)] * mine,
                    all_reduce_bytes(F32 * head, shape.replicas),
                )
        return total(replica, rows, solution_bytes(shape, rank), direction)


class SketchProtocol(GatherProtocol):
    """`gather` with the count-sketch codec: sketches of width m travel, weights are approximate."""

    name = "sketch"
    codec_name = "countsketch"
