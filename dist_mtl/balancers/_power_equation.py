"""The positive solution of M w = w^(-p) (elementwise), p > 0: FairGrad (p = 1/alpha) and Nash-MTL (p = 1).

It is the unique minimiser over w > 0 of the strictly convex
    f(w) = 1/2 w^T M w + sum_i phi(w_i),  phi'(w) = -w^(-p)
(phi = -log w for p = 1, -w^(1-p) / (1-p) otherwise), whose Hessian M + diag(p w^(-p-1)) is positive
definite for every PSD M. A minimiser exists exactly when f is bounded below on the orthant, i.e. when
no w >= 0, w != 0 has G w = 0: when no subset of the tasks is Pareto stationary (0 in the convex hull
of their gradients). Otherwise f decreases along such a ray forever and there is no solution.

Solver: damped Newton on f, started from the solution for orthogonal tasks, M_ii^(-1/(1+p)), times
the best common factor. The direction comes from a Cholesky factor of the diagonally scaled Hessian;
the step goes at most 99% of the way to the orthant's boundary and backtracks until Armijo's rule
holds for f or for the squared relative residual (the Newton direction descends on both). The second
matters when gradient norms differ by orders of magnitude: each task adds about w_i^(1-p) to f, so
some tasks' terms sink below f's rounding while their equations are still far from solved (a decrease
of f below 1e3 eps |f| does not count). Far from the solution the weights grow geometrically (about x2
per step for p = 1); near it, convergence is quadratic. M is scaled to unit largest diagonal first and
the solution scaled back (w = s^(-1/(1+p)) u for M = s M_1), so the result does not depend on the
scale of the gradients. `init` warm-starts from a nearby solution.

Certificate: the forward residual of the equation, max_i |(M w)_i w_i^p - 1| (0 at the solution),
which rounding cannot push below its floor 4 T eps max_i (|M| w)_i w_i^p (large when a task's
improvement <g_i, d> is a small difference of large terms: the problem is then ill-conditioned).
Converged when residual <= max(tol, floor) and floor <= 0.1. Otherwise the solver stops after
`max_iter` steps or when the line search makes no progress, reports converged = False, and returns its
last iterate (positive and finite).

No solution: for a Pareto-stationary subset (sum_S v_i g_i = 0, v >= 0), sum_S v_i <g_i, d> = 0, so
some task has <g_i, d> <= 0 and a residual >= 1 whatever w is: such M are never reported converged.
When some w_i passes `UNBOUNDED` times M_ii^(-1/(1+p)) the solver stops with `unbounded` = True as
well (for p > 1 f flattens and it may stall below the bound instead). The returned iterate then has
large weights whose direction G w nearly cancels on the stationary subset; callers should treat such
a step as failed (the info says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

EPS = float(np.finfo(np.float64).eps)
UNBOUNDED = 1e8  # largest w_i / (M_ii^(-1/(1+p))) before the problem is declared to have no solution
_TINY = 1e-300  # floor of a zero diagonal entry (only a direct call sees one: Balancer drops those tasks)
_TO_BOUNDARY = 0.99  # a step goes at most this fraction of the way to the orthant's boundary
_MAX_FLOOR = 0.1  # a rounding floor above this makes the residual meaningless: not converged
_FLAT = 1e3 * EPS  # a decrease of f below this (relative) is rounding: judge the step by the residual
_ARMIJO = 1e-4
_MIN_STEP = 1e-12


@dataclass(frozen=True)
class PowerSolveInfo:
    """Diagnostics of one solve: Newton steps, backward-error residual, convergence and no-solution flag."""

    iterations: int
    residual: float
    converged: bool
    unbounded: bool = False

    def as_info(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_iterations": float(self.iterations),
            f"{prefix}_residual": self.residual,
            f"{prefix}_converged": float(self.converged),
            f"{prefix}_unbounded": float(self.unbounded),
        }


# A residual this large means some task's <g_i, d> is far from its target 1 / w_i^p: no solution, not
# a slow one (a Pareto-stationary subset keeps it >= 1).
_NO_SOLUTION_RESIDUAL = 0.5


def power_weights(M: np.ndarray, p: float, tol: float, max_iter: int, prefix: str) -> tuple[np.ndarray, dict]:
    """Coefficients for FairGrad / Nash-MTL: the solution of M w = w^(-p), or, when there is none (a
    Pareto-stationary subset: `unbounded`, or a residual >= 0.5 on stopping), the documented fallback
    uniform 1/T with `<prefix>_fallback` = 1: the last iterate's huge, cancelling weights would make d
    rounding noise. Unconverged but close iterates are kept (`<prefix>_converged` = 0 says so)."""
    w, info = solve_power_equation(M, p, tol, max_iter)
    fallback = not info.converged and (info.unbounded or not info.residual < _NO_SOLUTION_RESIDUAL)
    if fallback:
        w = np.full(M.shape[0], 1.0 / M.shape[0])
    return w, {**info.as_info(prefix), f"{prefix}_fallback": float(fallback)}


def power_residual(M: np.ndarray, w: np.ndarray, p: float) -> float:
    """max_i |(M w)_i w_i^p - 1|: the equation's relative (forward) residual, 0 at the solution."""
    return float(np.max(np.abs((M @ w) * w**p - 1.0)))


def solve_power_equation(
    M: np.ndarray, p: float, tol: float, max_iter: int, init: np.ndarray | None = None
) -> tuple[np.ndarray, PowerSolveInfo]:
    """The w > 0 with M w = w^(-p) for a symmetric PSD M, and the solve's diagnostics (see module doc).

    `init` (positive, for the same M up to a small change) warm-starts Newton. An all-zero M has no
    solution and no direction to move in: it returns ones, converged, in no iterations.
    """
    T = M.shape[0]
    scale = float(np.max(np.diag(M)))
    if not scale > 0.0:
        return np.ones(T), PowerSolveInfo(0, 0.0, True)
    back = scale ** (-1.0 / (1.0 + p))  # w = back * u for the solution u of the scaled problem
    A = M / scale
    absA = np.abs(A)
    # The solution if the tasks were orthogonal; weights are measured against it (norms may differ a lot).
    reference = np.maximum(np.diag(A), _TINY) ** (-1.0 / (1.0 + p))
    if init is not None:
        u = np.asarray(init, dtype=np.float64) / back
        if u.shape != (T,) or not np.all(np.isfinite(u)) or not np.all(u > 0.0):
            raise ValueError(f"init must be a positive, finite ({T},) array")
    else:
        u = reference
    u = _ray_minimiser(A, u, p)
    f = _objective(A, u, p)
    iterations, unbounded = 0, False
    residual, floor = _residual(A, absA, u, p, T)
    while not (residual <= max(tol, floor) and floor <= _MAX_FLOOR) and iterations < max_iter:
        if float(np.max(u / reference)) > UNBOUNDED:
            unbounded = True
            break
        iterations += 1
        rhs = u ** (-p)
        grad = A @ u - rhs
        H = A.copy()
        H.flat[:: T + 1] += p * rhs / u
        d = 1.0 / np.sqrt(np.diag(H))
        try:
            # Row then column scaling: |H_ij| d_i d_j <= 1, while np.outer(d, d) alone can overflow.
            scaled = H * d[:, None] * d[None, :]
            factor = scipy.linalg.cho_factor(scaled, lower=True, check_finite=False)
            direction = -d * scipy.linalg.cho_solve(factor, d * grad, check_finite=False)
        except np.linalg.LinAlgError:  # H is PD in exact arithmetic; rounding only: use the diagonal
            direction = -grad / np.diag(H)
        slope = float(grad @ direction)
        weight = u**p  # frozen for this step: weight * grad is the relative residual at u
        merit = 0.5 * float(np.sum((weight * grad) ** 2))
        shrink = direction < 0.0
        t = min(1.0, _TO_BOUNDARY * float(np.min(-u[shrink] / direction[shrink]))) if shrink.any() else 1.0
        while True:
            trial = u + t * direction
            f_trial = _objective(A, trial, p)
            if -slope > _FLAT * (abs(f) + 1.0) and f_trial <= f + _ARMIJO * t * slope:
                break
            trial_merit = 0.5 * float(np.sum((weight * (A @ trial - trial ** (-p))) ** 2))
            if trial_merit <= (1.0 - 2.0 * _ARMIJO * t) * merit:
                break
            t *= 0.5
            if t < _MIN_STEP:
                break
        if t < _MIN_STEP:
            break
        u, f = trial, f_trial
        residual, floor = _residual(A, absA, u, p, T)
    converged = not unbounded and residual <= max(tol, floor) and floor <= _MAX_FLOOR
    return back * u, PowerSolveInfo(iterations, residual, converged, unbounded)


def _objective(A: np.ndarray, u: np.ndarray, p: float) -> float:
    barrier = -float(np.sum(np.log(u))) if p == 1.0 else float(np.sum(u ** (1.0 - p))) / (p - 1.0)
    return 0.5 * float(u @ A @ u) + barrier


def _residual(A: np.ndarray, absA: np.ndarray, u: np.ndarray, p: float, T: int) -> tuple[float, float]:
    """The forward residual max_i |(A u)_i u_i^p - 1| and its rounding floor 4 T eps max_i (|A| u)_i u_i^p."""
    up = u**p
    return float(np.max(np.abs((A @ u) * up - 1.0))), 4.0 * T * EPS * float(np.max((absA @ u) * up))


def _ray_minimiser(A: np.ndarray, u: np.ndarray, p: float) -> np.ndarray:
    """k u for the k > 0 minimising f(k u): k^(1+p) = sum u^(1-p) / (u^T A u), when u^T A u > 0."""
    quad = float(u @ A @ u)
    if not quad > 0.0:
        return u
    return (float(np.sum(u ** (1.0 - p))) / quad) ** (1.0 / (1.0 + p)) * u
