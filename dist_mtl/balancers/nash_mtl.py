"""Nash-MTL (Navon et al., ICML 2022, "Multi-task learning as a bargaining game"), Theorem 5.1.

The Nash bargaining solution is d = G alpha with alpha > 0 solving G^T G alpha = 1 / alpha
elementwise, i.e. <g_i, d> = 1 / alpha_i for every task. It is solved directly (damped Newton with a
certified residual, `_power_equation.py`, the FairGrad equation at alpha_fair = 1), not by the paper's
sequence of convex-concave (CCP) steps through cvxpy. The released code (and TorchJD's NashMTL) runs
at most 20 CCP steps and, when the cvxpy solve raises, silently keeps the previous alpha (nash-mtl issue
#21); its stop test checks the equation on the Frobenius-normalised Gramian, a different equation
unless ||M||_F = 1. Here a failed solve is never silent: `nash_mtl_converged` = 0. There is no
solution when a subset of the tasks is Pareto stationary (0 in the convex hull of their gradients:
e.g. g_2 = -g_1); then also `nash_mtl_unbounded` = 1 once the weights pass the bound, and the step
takes the documented fallback, uniform 1/T (`nash_mtl_fallback` = 1; `_power_equation.power_weights`).

Differences from the released code and TorchJD, on purpose: (1) the exact solution instead of up to 20
CCP steps (so the step's norm is exactly ||d|| = sqrt(T), since alpha^T M alpha = sum_i alpha_i
(M alpha)_i = T); (2) no state: the CCP's warm start from the previous step's alpha is not needed by a
direct solver, and every call is a pure function of M; (3) no `max_norm`: the released code clips
||d|| to max_norm (1.0 by default, which always binds since ||d|| = sqrt(T) > 1 for T >= 2), i.e.
multiplies alpha by max_norm / sqrt(T); that is a gradient clip the trainer can apply to any balancer,
and (4) no `update_weights_every`, which the trainer's generic `balancer.update_every` provides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers._power_equation import power_weights
from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.solver import check_solver_options

DEFAULT_TOL = 1e-12
DEFAULT_MAX_ITER = 100


@dataclass(frozen=True)
class NashMTL(Balancer):
    """alpha > 0 with M alpha = 1 / alpha; `tol` bounds the residual max_i |(M alpha)_i alpha_i - 1|."""

    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "nash_mtl"

    def __post_init__(self) -> None:
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        return power_weights(M, 1.0, self.tol, self.max_iter, "nash_mtl")
