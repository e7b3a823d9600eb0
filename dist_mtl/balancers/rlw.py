"""Random loss weighting (Lin et al., TMLR 2022, "Reasonable Effectiveness of Random Weighting"):
c = softmax(x) with x ~ N(0, I_T) drawn afresh every step. No Gramian.

The draw comes from a generator seeded by (balancer.seed, step), a pure function of the two: every
rank that computes it gets the same weights, and a resumed run draws what the uninterrupted one would.
`step` counts adopted steps (a skipped step draws again). Missing labels: a task with loss 0 (no
labelled sample) gets c = 0 and the softmax runs over the other tasks' entries of the same draw.
State (checkpointed): seed and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_mtl.balancers.base import LossBalancer
from dist_mtl.balancers.seeded import SeededSteps


def rlw_draw(num_tasks: int, seed: int, step: int) -> np.ndarray:
    """The standard normal draw of step `step` (a pure function of (seed, step))."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x524C57])))
    return rng.standard_normal(num_tasks)


@dataclass
class RLW(SeededSteps, LossBalancer):
    """c = softmax of a fresh standard normal draw (over the tasks with a label in the batch)."""

    name = "rlw"

    def loss_weights(
        self, losses: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float], Any]:
        x = rlw_draw(losses.shape[0], self.seed, self.step)
        logits = np.where(active, x, -np.inf)
        e = np.exp(logits - x[active].max())
        return e / e.sum(), {}, self.step + 1

    def take(self, pending: Any) -> None:
        self.step = int(pending)
