"""DualProj (Quinton & Rey 2024, TorchJD DualProj; GEM's Eq. 11, Lopez-Paz & Ranzato 2017): the mean
gradient projected onto the dual cone of the task gradients.

c = argmin_{v >= 1/T} v^T M v, so d = G c is the closest vector to g0 = (1/T) sum_i g_i with
<g_i, d> >= 0 for every task. Solved by `dual_cone.project_one`: `project_dual_cone`'s rounds for one
problem without the batching. Regularisation as in `upgrad`: TorchJD solves on M / tr(M) + reg_eps I
with norm_eps = reg_eps = 1e-4 for quadprog's sake; both default to 0 here (the exact projection), and
1e-4, 1e-4 reproduces TorchJD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.dual_cone import (
    check_regularization,
    dual_cone_info,
    project_one,
    regularized_gramian,
)
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, check_solver_options


@dataclass(frozen=True)
class DualProj(Balancer):
    """c = the dual-cone projection of the uniform weights (module doc)."""

    norm_eps: float = 0.0
    reg_eps: float = 0.0
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "dualproj"

    def __post_init__(self) -> None:
        check_regularization(self.norm_eps, self.reg_eps)
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        w, solve = project_one(
            regularized_gramian(M, self.norm_eps, self.reg_eps), np.full(T, 1.0 / T), self.tol, self.max_iter
        )
        return w, dual_cone_info(solve)
