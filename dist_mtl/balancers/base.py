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
    # What `Balancer.adopt` moves the balancer's state to once the caller adopts this step (a loss
    # balancer's next logits, a wrapper's inner output); None: `adopt` just calls `advance`.
    pending: Any = None


class Balancer(ABC):
    """Base class: validates and converts the inputs, subclasses implement `weights` on NumPy arrays."""

    name: ClassVar[str]

    @property
    def needs_losses(self) -> bool:
        """Whether `__call__` reads the task losses (callers may pass None otherwise)."""
        return False

    @property
    def needs_gramian(self) -> bool:
        """Whether `__call__` reads M. A balancer that does not (FAMO, UW, DWA, RLW: functions of the
        losses and their own state) lets the step skip the T backward passes and the Gramian exchange:
        one backward of sum_t c_t L_t, as uniform scaling costs. Such balancers accept M = None."""
        return True

    def reuse(self) -> np.ndarray | None:
        """Coefficients this step takes without solving (the `update_every` lever between updates);
        None (the default): solve. Must be the same on every rank: it depends only on what `follow`
        records, which every rank calls with the same arguments."""
        return None

    def follow(self, coefficients: torch.Tensor, skipped: bool) -> None:  # noqa: B027 (a no-op default)
        """Called on every rank after every step with the step's coefficients and whether it was skipped
        (the coordinator's broadcast result), so state that every rank must agree on (which steps solve)
        moves identically everywhere. Only the coordinator calls `adopt`."""

    def __call__(self, M: ArrayLike, losses: ArrayLike | None = None) -> BalancerOutput:
        """Coefficients for M; tasks with an exactly zero gradient (a zero row of M) are left out.

        A zero row is what a task with no labelled sample in the batch gives (label -1). Kept in, it
        would put the zero vector in MGDA's convex hull and stall every task for that step; so the
        other tasks are balanced among themselves and the zero-gradient tasks get coefficient 0 (their
        loss cannot change to first order anyway). Counted as `degenerate_zero_gradient_tasks`.
        """
        gramian = as_gramian(M)
        task_losses = as_losses(losses, gramian.shape[0]) if self.needs_losses else None
        T = gramian.shape[0]
        active = gramian.diagonal() > 0.0
        kept = int(np.count_nonzero(active))
        if kept in (T, 0):  # nothing to leave out, or nothing would remain
            coefficients, info = self.weights(gramian, task_losses)
        else:
            sub_losses = None if task_losses is None else task_losses[active]
            sub, info = self.weights(gramian[np.ix_(active, active)], sub_losses)
            coefficients = np.zeros(T)
            coefficients[active] = sub
        info = {**info, "degenerate_zero_gradient_tasks": float(T - kept) if kept else 0.0}
        return BalancerOutput(to_torch(coefficients), {k: float(v) for k, v in info.items()})

    @abstractmethod
    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        """Coefficients c for a symmetric, finite float64 Gramian M (and losses if `needs_losses`)."""

    def adopt(self, out: BalancerOutput) -> None:
        """The caller adopted `out` (this call's result; the step was not skipped): move the state on.

        The default moves it by `advance`; balancers whose next state comes from the call (a loss
        balancer's updated logits) put it in `out.pending` and take it here.
        """
        self.advance()

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


class LossBalancer(Balancer):
    """A balancer of the task losses and its own state alone: M is never read (callers pass None).

    The step then needs no Gramian: one backward of sum_t c_t L_t replaces the T backward passes
    (`needs_gramian` is False). Losses must be >= 0 (cross-entropies). A task with loss exactly 0 is a
    task with no labelled sample in the batch (label -1: the sum over nothing), whose gradient is zero:
    as `Balancer.__call__` does for a zero row of M, it is left out (coefficient 0, the other tasks
    balanced among themselves, counted as `degenerate_zero_gradient_tasks`), judged from the losses
    because there is no M to look at. Subclasses implement `loss_weights` on the active tasks and
    return their next state as `pending`, which `adopt` takes: a call never changes the balancer.
    """

    @property
    def needs_losses(self) -> bool:
        return True

    @property
    def needs_gramian(self) -> bool:
        return False

    def __call__(self, M: ArrayLike | None = None, losses: ArrayLike | None = None) -> BalancerOutput:
        if losses is None:
            raise ValueError(f"balancer {self.name!r} needs the task losses; got None")
        size = losses.numel() if isinstance(losses, torch.Tensor) else np.asarray(losses).size
        task_losses = as_losses(losses, size)
        if size == 0:
            raise ValueError("losses must be a non-empty (T,) vector")
        if (task_losses < 0).any():
            raise ValueError(f"balancer {self.name!r} needs losses >= 0; got {task_losses.tolist()}")
        active = task_losses > 0.0
        left_out = float((~active).sum()) if active.any() else 0.0
        if not active.any():  # nothing labelled at all: every task, so that the weights stay defined
            active[:] = True
        coefficients, info, pending = self.loss_weights(task_losses, active)
        info = {**info, "degenerate_zero_gradient_tasks": left_out}
        return BalancerOutput(to_torch(coefficients), {k: float(v) for k, v in info.items()}, pending)

    @abstractmethod
    def loss_weights(
        self, losses: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float], Any]:
        """(c with zeros outside `active`, info, the state to move to when the step is adopted)."""

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        """The `Balancer` form (M unread): every task active."""
        if losses is None:
            raise ValueError(f"balancer {self.name!r} needs the task losses; got None")
        coefficients, info, _ = self.loss_weights(losses, np.ones(losses.shape[0], dtype=bool))
        return coefficients, info

    def adopt(self, out: BalancerOutput) -> None:
        self.take(out.pending)

    @abstractmethod
    def take(self, pending: Any) -> None:
        """Move to the state a call computed (`BalancerOutput.pending`)."""


def check_num_tasks(name: str, state_len: int | None, losses: np.ndarray) -> None:
    """A stateful loss balancer's state is per task: its T is fixed by its first call."""
    if state_len is not None and state_len != losses.shape[0]:
        raise ValueError(
            f"balancer {name!r} holds state for {state_len} tasks but got {losses.shape[0]} losses"
        )


def check_number(
    path: str, value: Any, *, low: float, low_open: bool = True, high: float | None = None
) -> float:
    """A finite real option in (low, high] (or [low, ...) with low_open False); the error names the field."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = f"{high:g}]" if high is not None else "inf)"
        raise ValueError(f"{path} must be a finite number in {left}{low:g}, {right}; got {value!r}")
    return float(value)
