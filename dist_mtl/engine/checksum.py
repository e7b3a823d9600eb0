"""Periodic proof that the replicated state is identical on every rank that must hold it.

Every rank applies the same direction with the same optimizer state, so the shared parameters must
stay bit-identical. Every N steps each rank contributes (sum, sum of squares) of its flat shared
parameters in float64; one all-gather of 2W numbers lets every rank name the ranks that differ and
fail together, before a silent divergence trains W different models.

Buffers (BatchNorm running statistics) are checked only where they must be identical when the
check runs: with `model.norm=sync` every rank of a group that shares statistics (`watch_buffers`:
the replica group, the world for `rep`) applies the same reduced statistics, so they are compared
bit for bit within each such group; each rank then adds (sum, sum of squares) of its buffers and the
first rank of its group, and the one all-gather carries 5W numbers. With `model.norm=batch` the
replicas' running statistics legitimately differ until `gather_model` averages them, so they are not
compared (averaging first would make the comparison hold by construction).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_mtl.engine.comm import Comm, Group
from dist_mtl.observe import StepRecorder


class ReplicaDivergenceError(RuntimeError):
    """Replicated parameters (or synchronised norm statistics) differ across ranks."""


class ReplicaChecksum:
    def __init__(self, flat_params: torch.Tensor, comm: Comm, world: Group, every: int) -> None:
        self.flat = flat_params
        self.comm = comm
        self.world = world
        self.every = every
        self.buffers: Callable[[], torch.Tensor] | None = None
        self.gathered = torch.zeros(world.size, 2, dtype=torch.float64, device=flat_params.device)

    def watch_buffers(self, terms: Callable[[], torch.Tensor], group: Group) -> None:
        """Also compare `terms()` ((sum, sum of squares) in float64) within `group` (this rank's group;
        every rank of the world must call this, each with its own group)."""
        self.buffers = terms
        self.first = torch.tensor([float(group.ranks[0])], dtype=torch.float64, device=self.flat.device)
        self.gathered = torch.zeros(self.world.size, 5, dtype=torch.float64, device=self.flat.device)

    def __call__(self, step: int, rec: StepRecorder) -> None:
        """Compare at steps that are multiples of `every` (never when every is 0)."""
        if not self.every or step % self.every:
            return
        with rec.phase("exchange"):
            parts = [self.flat.sum(dtype=torch.float64), self.flat.square().sum(dtype=torch.float64)]
            local = torch.stack(parts)
            if self.buffers is not None:
                local = torch.cat([local, self.buffers().to(local.device), self.first])
            self.comm.all_gather(self.gathered, local, self.world)
            host = self.gathered.cpu()
        ranks = self.world.ranks
        differ = [ranks[i] for i in range(self.world.size) if not torch.equal(host[i, :2], host[0, :2])]
        if differ:
            raise ReplicaDivergenceError(
                f"step {step}: the shared parameters diverged across ranks: ranks {differ} differ from rank "
                f"{ranks[0]} (checksums (sum, sum of squares) per rank: {host[:, :2]}); "
                "checked every engine.checksum_every steps"
            )
        if host.shape[1] == 5:
            self._compare_buffers(step, host)

    def _compare_buffers(self, step: int, host: torch.Tensor) -> None:
        """Within each group (ranks that sent the same first rank), every rank's buffers equal the first's."""
        ranks = self.world.ranks
        first_of = {i: ranks.index(int(host[i, 4])) for i in range(self.world.size)}
        differ = [
            (ranks[i], ranks[j]) for i, j in first_of.items() if not torch.equal(host[i, 2:4], host[j, 2:4])
        ]
        if differ:
            listed = ", ".join(f"rank {a} vs rank {b}" for a, b in differ)
            raise ReplicaDivergenceError(
                f"step {step}: the BatchNorm running statistics diverged across ranks that share them "
                f"(model.norm=sync): {listed} (checksums (sum, sum of squares) per rank: {host[:, 2:4]}); "
                "checked every engine.checksum_every steps"
            )
