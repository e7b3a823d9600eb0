"""The coordinator's part of a step: solve on global rank 0, then broadcast (c, losses, skipped) to all.

Only rank 0 runs the balancer (and keeps its state). Every other rank gets the coefficients, the
losses (for its logs) and the skip flag in one float64 broadcast of 2T + 1 numbers; its single
device-to-host copy per step is that small buffer.
"""

from __future__ import annotations

import torch

from dist_mtl.balancers import Balancer
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution, solve_on_host


class Coordinator:
    def __init__(
        self, balancer: Balancer, comm: Comm, world: Group, num_tasks: int, device: torch.device
    ) -> None:
        self.balancer = balancer
        self.comm = comm
        self.world = world
        self.num_tasks = num_tasks
        self.is_coordinator = comm.rank == world.ranks[0]
        self.packed = torch.zeros(2 * num_tasks + 1, dtype=torch.float64, device=device)

    def solve(
        self, gramian: torch.Tensor | None, losses: torch.Tensor | None, rec: StepRecorder
    ) -> tuple[Solution, torch.Tensor]:
        """(host Solution, device coefficients); `gramian` and `losses` are read on rank 0 only.

        `gramian` is None for a balancer that does not read it (a loss balancer's LOSSES step)."""
        t = self.num_tasks
        if self.is_coordinator:
            if losses is None or (gramian is None and self.balancer.needs_gramian):
                raise ValueError("the coordinator (global rank 0) needs the Gramian and the losses to solve")
            with rec.phase("solve"):
                solution = solve_on_host(self.balancer, gramian, losses)
                flag = torch.tensor([float(solution.skipped)], dtype=torch.float64)
                self.packed.copy_(torch.cat([solution.coefficients, solution.losses, flag]))
        with rec.phase("exchange"):
            self.comm.broadcast(self.packed, self.world, src=0)
        if not self.is_coordinator:
            host = self.packed.to("cpu", copy=True)
            solution = Solution(host[:t], host[t : 2 * t], bool(host[2 * t]), {})
        return solution, self.packed[:t]
