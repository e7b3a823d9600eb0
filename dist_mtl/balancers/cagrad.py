"""CAGrad (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

max_d min_i <g_i, d> s.t. ||d - g0|| <= sqrt(phi), phi = c^2 ||g0||^2, g0 = (1/T) sum_i g_i. Its dual
is w = argmin_{w in simplex} F(w) = g_w^T g0 + sqrt(phi) ||g_w||, and d = g0 + (sqrt(phi) / ||g_w||) g_w,
so c_i = 1/T + (sqrt(phi) / ||g_w||) w_i with, on M alone, g_w^T g0 = w^T M 1 / T, ||g_w||^2 = w^T M w
and ||g0||^2 = 1^T M 1 / T^2. c = 0 gives the mean gradient.

Reading adopted: the paper's Algorithm 1 as TorchJD's CAGradWeighting writes it, without the official
code's final rescale d / (1 + c^2) (its default `rescale=1`): a constant factor, the learning rate's
business (SGD: lr / (1 + c^2) reproduces it). F is GetMTL's step-3 objective, so it is solved by the
same code (`getmtl.solve_trade_off`: exact simplex QPs along a root search, no cvxpy), and its
Frank-Wolfe duality gap is reported (`cagrad_gap`, converged when <= getmtl.STEP3_TOL).
When the optimum has ||g_w|| = 0 (Pareto stationary, within that tolerance), d is undefined in the
formula; as TorchJD does, c = 0 then (counted as `degenerate_pareto_stationary`, and not as an
unconverged solve: the answer does not use w). TorchJD decides this
with ||g_w|| < 1e-4 sqrt(tr M) and so returns 0 for nearly stationary points where this keeps the
formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer, uniform_weights
from dist_mtl.balancers.getmtl import STEP3_TOL, solve_trade_off
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, check_solver_options

DEFAULT_C = 0.4  # the paper's value on NYUv2 and Cityscapes


@dataclass(frozen=True)
class CAGrad(Balancer):
    """c = 1/T + (sqrt(phi) / ||g_w||) w (module doc); `tol`, `max_iter` go to the simplex QPs."""

    c: float = DEFAULT_C
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "cagrad"

    def __post_init__(self) -> None:
        c = self.c
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c < math.inf:
            raise ValueError(f"balancer.c must be >= 0 and finite; got {c!r}")
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        # c is scale invariant (sqrt(phi) / ||g_w|| is a ratio), so the arithmetic runs on M / max diag.
        T = M.shape[0]
        top = float(np.max(np.diag(M)))
        Mn = M / top if top > 0.0 else M
        row_sums = Mn.sum(axis=1)
        k = self.c * math.sqrt(max(float(row_sums.sum()), 0.0)) / T  # sqrt(phi) = c ||g0||
        info = {"cagrad_gap": 0.0, "cagrad_solves": 0.0, "cagrad_converged": 1.0}
        info["degenerate_pareto_stationary"] = 0.0
        if k == 0.0:
            return uniform_weights(T), info
        trade = solve_trade_off(Mn, row_sums / T, k, self.tol, self.max_iter)
        info |= {"cagrad_gap": trade.gap, "cagrad_solves": float(trade.solves)}
        info["cagrad_converged"] = float(trade.gap <= STEP3_TOL or trade.w is None)
        if trade.w is None:
            info["degenerate_pareto_stationary"] = 1.0
            return np.zeros(T), info
        gw_norm = math.sqrt(float(trade.w @ Mn @ trade.w))
        return uniform_weights(T) + (k / gw_norm) * trade.w, info
