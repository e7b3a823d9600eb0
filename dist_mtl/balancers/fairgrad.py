"""FairGrad (Ban & Ji, ICML 2024, "Fair resource allocation in multi-task learning"), Eq. 4.

The update d = G w maximises the alpha-fair utility of the task improvements <g_i, d>; its optimality
condition is <g_i, d> = w_i^(-1/alpha) for every task, i.e. M w = w^(-1/alpha) elementwise with w > 0.
alpha = 1 is proportional fairness (the Nash-MTL equation), alpha -> infinity approaches max-min
fairness, alpha -> 0 linear scalarisation.

Solved by damped Newton with a certified residual (`_power_equation.py`), not by the released code's
scipy `least_squares` (which TorchJD's FairGradWeighting also uses): that one stops on its own
tolerances (1e-8 on the cost and the step) and tells the caller nothing; on nearly Pareto-stationary
Gramians its residual max_i |(M w)_i w_i^(1/alpha) - 1| was 1e-4 to 7 where ours was at the rounding
floor. There is no positive solution when a subset of the tasks is Pareto stationary; then
`fairgrad_converged` = 0 (with `fairgrad_unbounded` = 1 once the weights pass the bound; for alpha < 1
the objective flattens and the solver may stall below it); with no solution (unbounded, or a residual
>= 0.5) the step takes the documented fallback, uniform 1/T (`fairgrad_fallback` = 1;
`_power_equation.power_weights`). alpha = 0 (TorchJD's uniform special case) is not accepted: it is
the `uniform` balancer up to a factor.
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
class FairGrad(Balancer):
    """w > 0 with M w = w^(-1/alpha); `tol` bounds the relative residual max_i |(M w)_i w_i^(1/alpha) - 1|."""

    alpha: float = 1.0
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "fairgrad"

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        return power_weights(M, 1.0 / self.alpha, self.tol, self.max_iter, "fairgrad")


def check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"balancer.alpha must be > 0; got {alpha!r}")
