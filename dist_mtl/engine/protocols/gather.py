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
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dist_mtl.engine.codecs import build_codec, payload_bytes
from dist_mtl.engine.protocols.base import StepContext, solution_bytes
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.traffic import F32, StepShape, all_reduce_bytes, broadcast_bytes, gather_bytes, total
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution


class GatherProtocol(TaskParallelProtocol):
    """Payloads gathered on the coordinator; lossless d broadcast, lossy d all-reduced from exact rows."""

    name = "gather"
    codec_name: ClassVar[str | None] = None  # None: engine.compression

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
        if self.gathered is None and self.is_root and self.k_size > 1:  # lossy codes: a buffer of their own
            shape = (self.k_size * self.t_max, self.codec.width)
            self.gathered = torch.zeros(shape, dtype=self.codec.dtype, device=self.device)
        # Rows of real tasks among the K * T_max gathered rows (the rest is padding).
        self.index = torch.tensor(
            [j * self.t_max + i for j in range(self.k_size) for i in range(self.split[j])], device=self.device
        )
        self.padded_c = torch.zeros(self.k_size * self.t_max, device=self.device)

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
        equal in size; task i's slot is the gradient part of row i."""
        gathered = flat.view(-1, self.params + 1)
        self.gathered = gathered if self.gathers_in_place else None
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

    def exchange(self, rec: StepRecorder) -> Solution:
        b = self.block
        gramian = losses = rows = None
        if self.replica == 0:
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
        world = shape.replicas * shape.k
        compression = cls.compression(shape.compression)
        payload = payload_bytes(compression, shape)
        direction = (
            broadcast_bytes(F32 * shape.params, world, rank)
            if compression == "none"
            else all_reduce_bytes(F32 * shape.params, shape.k)
        )
        return total(
            cls.replica_bytes(shape, rank, shape.split[k] * (shape.params + 1)),
            gather_bytes(payload, shape.k, k == 0) if r == 0 else (0, 0),
            solution_bytes(shape, rank),
            direction,
        )


class SketchProtocol(GatherProtocol):
    """`gather` with the count-sketch codec: sketches of width m travel, weights are approximate."""

    name = "sketch"
    codec_name = "countsketch"
