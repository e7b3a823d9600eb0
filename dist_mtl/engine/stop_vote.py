"""The ranks' agreement on when to stop, at no exposed cost per step.

Each step every rank contributes its stop reason to an all-reduce (MAX) on a gloo group of its own,
started asynchronously and read one step later, when it has long finished: no rank waits for it and
no device synchronisation is involved (the flag lives on the CPU even when training runs on CUDA).
Every rank reads the same result at the same step, so they all stop after the same step.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class StopVote:
    """vote(reason) -> the reason every rank agreed on at the previous step boundary."""

    def __init__(self, timeout_s: float) -> None:
        # Every rank creates the group, in the same order, as torch requires.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work: dist.Work | None = None

    def vote(self, reason: int) -> int:
        agreed = self.settle()
        self._flag = torch.tensor([reason], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def settle(self) -> int:
        """Wait for the outstanding vote (finished by now in practice) and return its result."""
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._flag.item())  # a CPU tensor (gloo): no device synchronisation
