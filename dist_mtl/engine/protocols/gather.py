"""Protocols `gather` and `sketch`: every task group's payloads gathered on the coordinator.

Each rank of replica 0 sends its losses and (raw or compressed) task-gradient rows; the coordinator
forms the Gramian of the K * T_max gathered rows and solves. Lossless (`gather` without compression):
the coordinator also forms d = G c from the rows it holds and broadcasts it. Lossy (`gather` with
engine.compression, and `sketch`, which is gather with the count-sketch codec): c is broadcast and d
is the all-reduce of sum over owned t of c_t g_t, formed from exact local gradients (DESIGN section 2).
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
        self.is_root = self.coordinator.is_coordinator
        width = self.codec.numel(self.t_max, self.params)
        self.received = (
            torch.zeros(self.k_size, width, dtype=self.codec.dtype, device=self.device)
            if self.is_root
            else None
        )
        # Rows of real tasks among the K * T_max gathered rows (the rest is padding).
        self.index = torch.tensor(
            [j * self.t_max + i for j in range(self.k_size) for i in range(self.split[j])], device=self.device
        )
        self.padded_c = torch.zeros(self.k_size * self.t_max, device=self.device)

    @classmethod
    def compression(cls, configured: str) -> str:
        """The codec this protocol runs: its own (`sketch`) or engine.compression."""
        return cls.codec_name or configured

    def block_numel(self) -> int:
        return self.t_max + self.t_max * self.params

    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """[losses (T_max) | grads (T_max, P)]: every rank pads to T_max rows so the gathered payloads
        are equal in size; task i's slot is row i."""
        grads = flat[self.t_max :].view(self.t_max, self.params)
        self.payload = flat
        return TaskBlock(
            losses=flat[: self.t_max],
            grads=grads,
            filled=self.t_max + self.mine * self.params,
            slots=list(grads.unbind(0)),
            direction=direction,
            source=direction,
        )

    def exchange(self, rec: StepRecorder) -> Solution:
        b = self.block
        gramian = losses = rows = None
        if self.replica == 0:
            with rec.phase("exchange"):
                wire = self.codec.encode(b.losses, b.grads, self.payload)
                self.comm.gather(wire, self.received, self.groups.task, dst=0)
        if self.received is not None:
            with rec.phase("solve"):
                if self.codec.lossless:
                    padded_losses, rows = self.codec.decode(self.received, self.t_max)
                    padded = rows @ rows.T
                else:
                    padded, padded_losses = self.codec.gramian(self.received, self.t_max)
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
            cls.replica_bytes(shape, rank, max(shape.split) + shape.split[k] * shape.params),
            gather_bytes(payload, shape.k, k == 0) if r == 0 else (0, 0),
            solution_bytes(shape, rank),
            direction,
        )


class SketchProtocol(GatherProtocol):
    """`gather` with the count-sketch codec: sketches of width m travel, weights are approximate."""

    name = "sketch"
    codec_name = "countsketch"
