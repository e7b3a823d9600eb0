"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, MTAN): weights from the loss descent rates.
No Gramian.

    r_t = L_t(k-1) / L_t(k-2),    c_t = T exp(r_t / temperature) / sum_s exp(r_s / temperature)
(the paper's lambda, which sums to T; temperature 2 as in the paper), and c_t = 1 for the first two
steps, which have no two previous losses. The paper averages the losses over an epoch; here L(k-1)
and L(k-2) are the losses of the previous two adopted steps (per-step batch losses), so DWA reacts
within steps and needs no epoch bookkeeping, at the price of batch noise in r.

Missing labels: a task with loss 0 at this step (no labelled sample) gets c = 0 and the others share
the total among themselves (c sums to the number of active tasks); a task whose loss was 0 in either
of the previous two steps has no ratio and takes r_t = 1. State (checkpointed): the last two loss
vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_mtl.balancers.base import LossBalancer, check_num_tasks, check_number

DEFAULT_TEMPERATURE = 2.0


def dwa_coefficients(
    last: np.ndarray | None, before: np.ndarray | None, active: np.ndarray, temperature: float
) -> np.ndarray:
    """n_active softmax(r / temperature) over the active tasks (1 each without two previous losses)."""
    if last is None or before is None:
        return active.astype(np.float64)
    usable = (last > 0.0) & (before > 0.0)
    ratio = np.where(usable, last / np.where(usable, before, 1.0), 1.0)
    logits = np.where(active, ratio / temperature, -np.inf)
    e = np.exp(logits - logits[active].max())
    return active.sum() * e / e.sum()


@dataclass
class DWA(LossBalancer):
    """c = T softmax(r / temperature) with r the ratio of the last two steps' losses."""

    temperature: float = DEFAULT_TEMPERATURE
    history: list[np.ndarray] = field(default_factory=list, init=False, repr=False)  # [L(k-2), L(k-1)]

    name = "dwa"

    def __post_init__(self) -> None:
        self.temperature = check_number("balancer.temperature", self.temperature, low=0.0)

    def loss_weights(
        self, losses: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float], Any]:
        check_num_tasks(self.name, len(self.history[-1]) if self.history else None, losses)
        before, last = self.history if len(self.history) == 2 else (None, None)
        c = dwa_coefficients(last, before, active, self.temperature)
        return c, {"dwa_warmup": float(len(self.history) < 2)}, [*self.history, losses.copy()][-2:]

    def take(self, pending: Any) -> None:
        self.history = list(pending)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.tolist() for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"history"} or not isinstance(state["history"], list) or len(state["history"]) > 2:
            raise ValueError(f"dwa state must be {{'history': [at most 2 loss vectors]}}; got {state!r}")
        self.history = [np.asarray(h, dtype=np.float64) for h in state["history"]]
