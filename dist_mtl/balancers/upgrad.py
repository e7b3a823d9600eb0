"""UPGrad (Quinton & Rey 2024, "Jacobian descent for multi-objective optimization"): the mean of the
projections of every task gradient onto the dual cone of all of them.

Reading adopted (the paper's, with the TorchJD UPGradWeighting layout): w_i = argmin_{v >= e_i} v^T M v
is the projection of g_i onto {x : G^T x >= 0} (Prop. 1), and c = (1/T) sum_i w_i (TorchJD projects
the rows of diag(1/T) and sums them, the same by homogeneity). The T projections are solved together
by `dual_cone.project_dual_cone` (batched primal-dual active set, Lawson-Hanson fallback, KKT
certificate), so d = G c has <g_i, d> >= 0 for every task.

Regularisation: TorchJD's QuadprogProjector solves on M / tr(M) + reg_eps I (zero if tr(M) < norm_eps)
with norm_eps = reg_eps = 1e-4 because quadprog needs a positive definite matrix. The solver here does
not, so both default to 0: the exact projection, invariant to the scale of M. `norm_eps=1e-4,
reg_eps=1e-4` reproduces TorchJD (the ridge moves c by about reg_eps T relative to the diagonal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.dual_cone import (
    check_regularization,
    dual_cone_info,
    project_dual_cone,
    regularized_gramian,
)
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, check_solver_options


@dataclass(frozen=True)
class UPGrad(Balancer):
    """c = mean of the tasks' dual-cone projections w_i (module doc); `tol`, `max_iter` go to the solve."""

    norm_eps: float = 0.0
    reg_eps: float = 0.0
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "upgrad"

    def __post_init__(self) -> None:
        check_regularization(self.norm_eps, self.reg_eps)
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        W, solve = project_dual_cone(
            regularized_gramian(M, self.norm_eps, self.reg_eps), np.eye(T), self.tol, self.max_iter
        )
        return W.mean(axis=0), dual_cone_info(solve)
