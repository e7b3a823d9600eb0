"""Periodic proof that the replicated shared parameters are identical on every rank.

Every rank applies the same direction with the same optimizer state, so the shared parameters must
stay bit-identical. Every N steps each rank contributes (sum, sum of squares) of its flat shared
parameters in float64; one all-gather of 2W numbers lets every rank name the ranks that differ and
fail together, before a silent divergence trains W different models.
"""

from __future__ import annotations

import torch

from dist_mtl.engine.comm import Comm, Group
from dist_mtl.observe import StepRecorder


class ReplicaDivergenceError(RuntimeError):
    """Replicated parameters differ across ranks."""


class ReplicaChecksum:
    def __init__(self, flat_params: torch.Tensor, comm: Comm, world: Group, every: int) -> None:
        self.flat = flat_params
        self.comm = comm
        self.world = world
        self.every = every
        self.gathered = torch.zeros(world.size, 2, dtype=torch.float64, device=flat_params.device)

    def __call__(self, step: int, rec: StepRecorder) -> None:
        """Compare at steps that are multiples of `every` (never when every is 0)."""
        if not self.every or step % self.every:
            return
        with rec.phase("exchange"):
            local = torch.stack(
                [self.flat.sum(dtype=torch.float64), self.flat.square().sum(dtype=torch.float64)]
            )
            self.comm.all_gather(self.gathered, local, self.world)
            host = self.gathered.cpu()
        differ = [self.world.ranks[i] for i in range(self.world.size) if not torch.equal(host[i], host[0])]
        if differ:
            raise ReplicaDivergenceError(
                f"step {step}: the shared parameters diverged across ranks: ranks {differ} differ from rank "
                f"{self.world.ranks[0]} (checksums (sum, sum of squares) per rank: {host}); "
                "checked every engine.checksum_every steps"
            )
