"""The balancer contract: a pure map (Gramian, losses, own state) -> coefficients c, with d = G c.

Balancers never see parameters, devices or process groups; the engine moves tensors and calls them on
the host with a T x T Gramian. Inside, everything is float64 NumPy; the boundary converts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from dist_mtl.balancers._arrays import ArrayLike, as_gramian, as_losses, to_torch


@dataclass(frozen=True)
class BalancerOutput:
    """Coefficients (float64, CPU, shape (T,)) of the direction d = G c, and scalar diagnostics to log."""

    coefficients: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)


class Balancer(ABC):
    """Base class: validates and converts the inputs, subclasses implement `weights` on NumPy arrays."""

    name: ClassVar[str]

    @property
    def needs_losses(self) -> bool:
        """Whether `__call__` reads the task losses (callers may pass None otherwise)."""
        return False

    def __call__(self, M: ArrayLike, losses: ArrayLike | None = None) -> BalancerOutput:
        """Coefficients for M; tasks with an exactly zero gradient (a zero row of M) are left out.

        A zero row is what a task with no labelled sample in the batch gives (label -1). Kept in, it
        would put the zero vector in MGDA's convex hull and stall every task for that step; so the
        other tasks are balanced among themselves and the zero-gradient tasks get coefficient 0 (their
        loss cannot change to first order anyway). Counted as `degenerate_zero_gradient_tasks`.
        """
        gramian = as_gramian(M)
        task_losses = as_losses(losses, gramian.shape[0]) if self.needs_losses else None
        active = np.diag(gramian) > 0.0
        if active.all() or not active.any():  # nothing to leave out, or nothing would remain
            coefficients, info = self.weights(gramian, task_losses)
        else:
            sub_losses = None if task_losses is None else task_losses[active]
            sub, info = self.weights(gramian[np.ix_(active, active)], sub_losses)
            coefficients = np.zeros(gramian.shape[0])
            coefficients[active] = sub
        info = {**info, "degenerate_zero_gradient_tasks": float((~active).sum()) if active.any() else 0.0}
        return BalancerOutput(to_torch(coefficients), {k: float(v) for k, v in info.items()})

    @abstractmethod
    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        """Coefficients c for a symmetric, finite float64 Gramian M (and losses if `needs_losses`)."""

    def advance(self) -> None:  # noqa: B027 (a deliberate no-op default, not an abstract method)
        """Called once after each successful (not skipped) step; stateless balancers do nothing.

        `__call__` never changes the balancer (the same input gives the same output however often it
        is called), so state that moves from step to step (MAMG's random orders) moves here, when the
        caller has adopted the step's coefficients.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint; stateless balancers have none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; a stateless balancer accepts only an empty dict."""
        if state:
            raise ValueError(f"balancer {self.name!r} is stateless; got state keys {sorted(state)}")


def solver_info(prefix: str, iterations: int, gap: float, converged: bool) -> dict[str, float]:
    """The min-norm diagnostics every solving balancer logs under the same keys."""
    return {
        f"{prefix}_iterations": float(iterations),
        f"{prefix}_gap": gap,
        f"{prefix}_converged": float(converged),
    }


def uniform_weights(num_tasks: int) -> np.ndarray:
    return np.full(num_tasks, 1.0 / num_tasks)
