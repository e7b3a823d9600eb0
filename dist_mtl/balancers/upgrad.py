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
    DualConeOptions,
    dual_cone_info,
    project_dual_cone,
)


@dataclass(frozen=True)
class UPGrad(DualConeOptions, Balancer):
    """c = mean of the tasks' dual-cone projections w_i (module doc); `tol`, `max_iter` go to the solve."""

    name = "upgrad"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        W, solve = project_dual_cone(self.gramian(M), np.eye(T), self.tol, self.max_iter)
        return W.mean(axis=0), dual_cone_info(solve)
