"""GetMTL (Chai et al., ACL 2023, seed 000): a maximin direction in a neighbourhood of the mean gradient.

The paper's printed sub- and superscripts were lost; the reading adopted (DESIGN.md section 4) is the
one consistent with its Lagrangian, Eq. 19-28. Problem 2 there is

    max_d min_{w in simplex} <g~_w, d>   s.t.  ||d - g0||^2 <= eps ||g0|| ||d||^2,

with g~_i = beta_i g_i (beta: MGDA weights), g~_w = sum_i w_i g~_i and g0 = (1/T) sum_i g_i. Eq. 22
(stationarity in d), 23, 26 (lambda = ||g~_w|| / (sqrt(eps) ||g0||^(3/2))) and 28 give, on M alone:

1. beta = min-norm weights of M; M~ = diag(beta) M diag(beta).
2. ||g0||^2 = 1^T M 1 / T^2 and a_i = <g~_i, g0> = beta_i (M 1)_i / T.
3. w = argmin over the simplex of J(w) = (a^T w + k sqrt(w^T M~ w)) / (1 - eps ||g0||),
   with k = sqrt(eps) ||g0||^1.5.
4. c_i = (1/T + (k / ||g~_w||) w_i beta_i) / (1 - eps ||g0||), so d = G c.

Edge cases, each counted in the diagnostics: ||g~_w|| = 0 (the optimal w sits on tasks with beta_i = 0)
gives d = g0 / (1 - eps ||g0||); 1 - eps ||g0|| <= 0 would flip the direction, so the scale factor is
dropped (the constraint set is then no longer a ball and the derivation does not hold). eps -> 0 gives
the mean gradient. The authors' released code differs from the paper (softmax of w times MGDA scales,
another objective); the paper is what is implemented here.

Step 3 is solved to a stated tolerance: the positive factor 1/(1 - eps ||g0||) does not move the argmin,
and the minimiser of F(w) = a^T w + k ||G~ w|| also minimises the quadratic 1/2 w^T M~ w + rho a^T w at
the rho where ||G~ w(rho)|| = k rho (same gradient there, both convex). ||G~ w(rho)|| / rho decreases
in rho, so a bracketed root search over log rho, each point an exact simplex QP (the min-norm solver on
the translated points g~_i + rho g0), finds it; the Frank-Wolfe gap of F at the answer is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from dist_mtl.balancers.base import Balancer, solver_info, uniform_weights
from dist_mtl.balancers.min_norm import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    EPS,
    check_solver_options,
    solve_min_norm,
    solve_simplex_qp,
)

DEFAULT_EPS = 0.025  # one of the two values the paper found best (Fig. 8: 0.0075 and 0.025)
STEP3_TOL = 1e-8  # relative Frank-Wolfe gap of J at which step 3 counts as converged
_BRACKET_FACTOR = 16.0
_BRACKET_STEPS = 24  # rho down to 16^-24 of its upper bound before calling ||g~_w|| zero


@dataclass(frozen=True)
class TradeOff:
    """Step 3's answer: w (None when ||g~_w|| = 0 at the optimum) and how well it was solved."""

    w: np.ndarray | None
    gap: float
    solves: int


def solve_trade_off(Mt: np.ndarray, a: np.ndarray, k: float, tol: float, max_iter: int) -> TradeOff:
    """w minimising a^T w + k ||G~ w|| over the simplex, given M~ = G~^T G~, a = G~^T g0 and k > 0."""
    T = Mt.shape[0]
    s_max = math.sqrt(max(float(np.max(np.diag(Mt))), 0.0))
    if s_max == 0.0:
        return TradeOff(None, 0.0, 0)
    zero = 64 * T * EPS * s_max**2  # ||G~ w||^2 at or below rounding of the quadratic form
    support: list[int] = []
    last: dict[str, float | np.ndarray] = {}

    def excess(log_rho: float) -> float:
        nonlocal support
        rho = math.exp(log_rho)
        w, _ = solve_simplex_qp(Mt, rho * a, tol, max_iter, support)
        support = np.flatnonzero(w).tolist()
        last.update(w=w, rho=rho, s2=float(w @ Mt @ w), solves=last.get("solves", 0) + 1)
        return math.sqrt(max(last["s2"], 0.0)) / rho - k

    # ||G~ w|| <= s_max, so excess < 0 from rho = 2 s_max / k on; walk down until it turns positive.
    # ||G~ w(rho)|| does not grow as rho falls, so once it is zero the optimum has ||g~_w|| = 0.
    hi = math.log(2.0 * s_max / k)
    lo = hi
    for _ in range(_BRACKET_STEPS):
        lo -= math.log(_BRACKET_FACTOR)
        if excess(lo) > 0.0:
            root = brentq(excess, lo, lo + math.log(_BRACKET_FACTOR), xtol=1e-13, rtol=4 * EPS, maxiter=200)
            excess(root)
            break
        if last["s2"] <= zero:
            break
    w, rho, s2 = last["w"], last["rho"], last["s2"]
    gap = _relative_gap(Mt, a, k, w, rho)
    return TradeOff(None if s2 <= zero else w, gap, int(last["solves"]))


def _relative_gap(Mt: np.ndarray, a: np.ndarray, k: float, w: np.ndarray, rho: float) -> float:
    """Duality gap of F(w) = a^T w + k ||G~ w|| from the QP solution w = w(rho), relative to F's size.

    F* = max over ||u|| <= 1 of min_i (a_i + k <g~_i, u>); u = mu G~ w / k with mu = min(1/rho, k/s) is
    feasible, so min_i (a + mu M~ w)_i is a lower bound (the Frank-Wolfe bound of F when mu = k/s).
    """
    quad = Mt @ w
    s = math.sqrt(max(float(w @ quad), 0.0))
    mu = 1.0 / rho if s == 0.0 else min(1.0 / rho, k / s)
    upper = float(a @ w) + k * s
    lower = float((a + mu * quad).min())
    size = max(abs(float(a @ w)) + k * s, EPS * (float(np.abs(a).max()) + k * math.sqrt(float(Mt.max()))))
    return max(upper - lower, 0.0) / size


@dataclass(frozen=True)
class GetMTL(Balancer):
    """The four steps in the module doc; `tol` and `max_iter` go to every min-norm / QP solve."""

    eps: float = DEFAULT_EPS
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "getmtl"

    def __post_init__(self) -> None:
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < eps <= 1.0:
            raise ValueError(f"balancer.eps must be in (0, 1]; got {eps!r}")
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        beta, mgda = solve_min_norm(M, self.tol, self.max_iter)
        row_sums = M.sum(axis=1)
        g0_norm = math.sqrt(max(float(row_sums.sum()), 0.0)) / T
        k = math.sqrt(self.eps) * g0_norm**1.5
        scale = 1.0 - self.eps * g0_norm
        info = solver_info("solver", mgda.iterations, mgda.gap, mgda.converged)
        info |= {"getmtl_g0_norm": g0_norm, "degenerate_zero_gw": 0.0, "degenerate_no_scale": 0.0}
        coefficients = uniform_weights(T)
        if k > 0.0:
            scaled = np.outer(beta, beta) * M
            trade = solve_trade_off(scaled, beta * row_sums / T, k, self.tol, self.max_iter)
            info |= {"getmtl_gap": trade.gap, "getmtl_solves": float(trade.solves)}
            info["getmtl_converged"] = float(trade.gap <= STEP3_TOL)
            if trade.w is None:
                info["degenerate_zero_gw"] = 1.0
            else:
                gw_norm = math.sqrt(float(trade.w @ scaled @ trade.w))
                coefficients = coefficients + (k / gw_norm) * trade.w * beta
        if scale <= 0.0:
            info["degenerate_no_scale"] = 1.0
        else:
            coefficients = coefficients / scale
        return coefficients, info
