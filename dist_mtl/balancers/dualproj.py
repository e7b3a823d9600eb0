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
    DualConeOptions,
    dual_cone_info,
    project_one,
)


@dataclass(frozen=True)
class DualProj(DualConeOptions, Balancer):
    """c = the dual-cone projection of the uniform weights (module doc)."""

    name = "dualproj"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        w, solve = project_one(self.gramian(M), np.full(T, 1.0 / T), self.tol, self.max_iter)
        return w, dual_cone_info(solve)
