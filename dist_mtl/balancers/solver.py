"""Minimum-norm point of the convex hull of the task gradients, computed on the Gramian alone.

min over the simplex of a^T M a. Frank-Wolfe (the MGDA paper's solver) needs thousands of steps for a
1e-8 duality gap, so this is Wolfe's (1976) min-norm-point algorithm written on M: an active set (the
"corral") whose affine minimiser is solved exactly, grown by Frank-Wolfe vertices and shrunk by line
searches that keep the iterate on the simplex. It ends in finitely many steps in exact arithmetic, and
the stopping rule is the Frank-Wolfe duality gap, so every answer carries its own certificate.

The same code minimises 1/2 x^T Q x + q^T x over the simplex when that equals a min-norm problem of
translated points (q = B^T v for Q = B^T B: 1/2 ||B x + v||^2 on the simplex, up to a constant); GetMTL
needs this form. The affine minimiser of a corral S solves Q_SS x + q_S = nu 1 with 1^T x = 1. Adding
c 11^T to Q_SS only shifts nu, and A = Q_SS + c 11^T is positive definite exactly when the corral's
points are affinely independent, so a Cholesky factor of A gives
x = (1 + 1^T A^-1 q_S) / (1^T A^-1 1) A^-1 1 - A^-1 q_S.

This module is the algorithm as a reader expects it. What makes it fast and robust at large T lives
beside it: `corral.py` keeps the factor of A current (batched extension, constraint-based drops, lazy
refactor) and `large_t.py` holds the moves beyond the textbook (batched insertion, drops at once, and
the pairwise exchange that finishes near-duplicate tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dist_mtl.balancers._arrays import ArrayLike, as_gramian, to_torch
from dist_mtl.balancers.corral import EPS, Corral
from dist_mtl.balancers.large_t import drop_at_once, enter

__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "EPS",
    "MinNormInfo",
    "check_solver_options",
    "check_warm_start",
    "min_norm",
    "relative_gap",
    "solve_min_norm",
    "solve_simplex_qp",
]

DEFAULT_TOL = 1e-10
DEFAULT_MAX_ITER = 10_000


@dataclass(frozen=True)
class MinNormInfo:
    """Diagnostics of one solve; `gap` is the Frank-Wolfe duality gap relative to the objective's size."""

    iterations: int
    gap: float
    converged: bool
    degenerate: str | None = None


def min_norm(
    M: ArrayLike, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, warm: ArrayLike | None = None
) -> tuple[torch.Tensor, MinNormInfo]:
    """Simplex weights a minimising a^T M a, as a float64 (T,) tensor, and the solve's diagnostics.

    Stops when a^T M a - min_i (M a)_i <= tol * max(a^T M a, T eps) with M scaled to unit largest
    diagonal, or when floating point allows no further progress; `converged` then says whether the
    gap is at rounding level (64 T eps). `max_iter` caps the affine solves (the unit of work).
    `degenerate` names the special cases: single_task, zero_gramian, identical_tasks (T = 2) and
    pareto_stationary (the minimum norm is zero to working precision).

    `warm` (optional, T weights >= 0 with a positive sum, e.g. the previous step's answer on a nearby
    M) starts the solver from that support and those weights instead of a single vertex. It changes
    the work, not the answer: the same duality-gap test ends both solves.
    """
    check_solver_options(tol, max_iter)
    gramian = as_gramian(M)
    if warm is not None:
        warm = check_warm_start(warm, gramian.shape[0])
    weights, info = solve_min_norm(gramian, tol, max_iter, warm)
    return to_torch(weights), info


def check_solver_options(tol: float, max_iter: int, prefix: str = "") -> None:
    """Reject a tolerance or iteration cap that cannot be met, naming the argument."""
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"{prefix}tol must be a finite number >= 0; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise ValueError(f"{prefix}max_iter must be an integer >= 1; got {max_iter!r}")


def check_warm_start(warm: ArrayLike, num_tasks: int, name: str = "warm") -> np.ndarray:
    """`warm` as float64 (T,) weights; a wrong shape, a non-finite or negative entry, or a zero sum is
    a ValueError naming it."""
    if isinstance(warm, torch.Tensor):
        warm = warm.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(warm, dtype=np.float64)
    if arr.shape != (num_tasks,):
        raise ValueError(f"{name} must have shape ({num_tasks},), one weight per task; got {arr.shape}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or not arr.sum() > 0.0:
        raise ValueError(f"{name} must be finite weights >= 0 with a positive sum; got {arr.tolist()}")
    return arr


def solve_min_norm(
    M: np.ndarray, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, warm: np.ndarray | None = None
) -> tuple[np.ndarray, MinNormInfo]:
    """NumPy core of `min_norm` for a symmetric float64 Gramian; `warm` as checked by `check_warm_start`."""
    T = M.shape[0]
    if T == 1:
        return np.ones(1), MinNormInfo(0, 0.0, True, "single_task")
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:
        return np.full(T, 1.0 / T), MinNormInfo(0, 0.0, True, "zero_gramian")
    if T == 2:
        return _two_tasks(M / scale)
    if warm is None:
        return _wolfe(M, scale, np.zeros(T), tol, max_iter, ())
    support = np.flatnonzero(warm > 0.0)
    support = support[np.argsort(-warm[support], kind="stable")]  # heaviest first: they enter first
    return _wolfe(M, scale, np.zeros(T), tol, max_iter, support, warm)


def solve_simplex_qp(
    Q: np.ndarray, q: np.ndarray, tol: float, max_iter: int, init: Sequence[int] = ()
) -> tuple[np.ndarray, MinNormInfo]:
    """min over the simplex of 1/2 x^T Q x + q^T x for a translated min-norm problem (see module doc).

    `init` seeds the corral (a warm start from a nearby problem's support).
    """
    T = Q.shape[0]
    scale = float(np.max(np.diag(Q)))
    if T == 1 or scale <= 0.0:
        weights = np.zeros(T)
        weights[int(np.argmin(q))] = 1.0
        return weights, MinNormInfo(0, 0.0, True, "single_task" if T == 1 else "zero_gramian")
    return _wolfe(Q, scale, q / scale, tol, max_iter, init)


def relative_gap(M: np.ndarray, a: np.ndarray) -> float:
    """(a^T M a - min_i (M a)_i) / max(a^T M a, T eps), with M scaled to unit largest diagonal."""
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:
        return 0.0
    grad = (M @ a) / scale
    fx = float(a @ grad)
    return max(fx - float(grad.min()), 0.0) / max(fx, M.shape[0] * EPS)


def _two_tasks(M: np.ndarray) -> tuple[np.ndarray, MinNormInfo]:
    """Closed form: a = (g, 1 - g) with g = <g2 - g1, g2> / ||g1 - g2||^2 clipped to [0, 1]."""
    spread = M[0, 0] + M[1, 1] - 2.0 * M[0, 1]
    if spread <= 8 * EPS * (M[0, 0] + M[1, 1]):
        weights, degenerate = np.array([0.5, 0.5]), "identical_tasks"
    else:
        g = min(max((M[1, 1] - M[0, 1]) / spread, 0.0), 1.0)
        weights, degenerate = np.array([g, 1.0 - g]), None
    if float(weights @ M @ weights) <= 16 * 2 * EPS:  # the same rounding level as _wolfe's, T = 2
        degenerate = degenerate or "pareto_stationary"
    return weights, MinNormInfo(1, relative_gap(M, weights), True, degenerate)


def _wolfe(
    Q: np.ndarray,
    scale: float,
    q: np.ndarray,
    tol: float,
    max_iter: int,
    init: Sequence[int],
    init_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, MinNormInfo]:
    """Wolfe's min-norm-point algorithm for Q / scale, which has unit largest diagonal (so c = 1 in A).

    Q is read, never copied: the division by `scale` happens on the blocks and products used.
    Minor cycles move to the corral's affine minimiser, dropping points whose weight reaches 0; a major
    cycle checks the duality gap and brings in improving vertices. Every affine solve counts against
    `max_iter`. The large-T moves (`large_t.py`) keep the textbook's termination argument.

    Warm start: the corral starts as the tasks `init` (in that order, skipping any that is affinely
    dependent on those before it) with the weights `init_weights` on them (a length-T vector),
    renormalised, or uniform weights without them. Without `init_weights` the corral first holds
    the best vertex, as a cold start does. Any starting simplex point works: Wolfe's cycles only need
    the corral affinely independent, and a seed that should not be in the support leaves it in the
    first minor cycle like any other point.
    """
    T = Q.shape[0]
    tiny = T * EPS
    has_q = bool(q.any())
    seeds = np.asarray(init, dtype=np.intp)
    if init_weights is None or not len(seeds):
        start = int((0.5 * Q.diagonal() / scale + q).argmin())
        seeds = np.unique(seeds)
    else:
        start, seeds = int(seeds[0]), seeds[1:]
    corral = Corral(Q, scale, q if has_q else None, start)
    seeds = seeds[seeds != start]
    while len(seeds):  # warm start: admit the seeds, skipping any that is affinely dependent
        k = corral.extend(seeds)
        seeds = seeds[k + 1 :]
    if init_weights is not None and len(init):
        lam = init_weights[corral.S]
        corral.lam = lam / lam.sum()  # the first seed (start) is in the corral with a positive weight
    elif len(corral.S) > 1:
        corral.lam = np.full(len(corral.S), 1.0 / len(corral.S))
    iterations, stalled, capped, f_prev = 0, False, False, np.inf
    while True:
        # Minor cycles: move toward the corral's affine minimiser, dropping points whose weight hits 0.
        while True:
            if iterations >= max_iter:
                capped = True
                break
            iterations += 1
            alpha, _ = corral.affine()
            out = corral.nonpositive(alpha)
            if out is None:
                corral.lam = alpha
                break
            if not len(out):  # NaN: only a numerically singular factor can do this
                stalled = True
                break
            accepted, used = drop_at_once(corral, alpha, out, max_iter - iterations, f_prev)
            iterations += used
            if accepted:
                break
            # Wolfe's line search: the furthest point toward alpha that stays on the simplex.
            lam, neg = corral.lam, corral.nonpositive(alpha)
            ratio = lam[neg] / np.maximum(lam[neg] - alpha[neg], np.finfo(np.float64).tiny)
            theta = float(ratio.min())
            lam += theta * (alpha - lam)
            if not corral.drop(neg[ratio <= theta], lam):
                stalled = True
                break
        # Major cycle: the duality gap certifies the point; improving vertices enter the corral.
        w = corral.weights()
        quad = Q @ w
        quad /= scale
        x_quad = float(w @ quad)
        if has_q:
            grad, x_lin = quad + q, float(w @ q)
        else:
            grad, x_lin = quad, 0.0
        size = max(x_quad + abs(x_lin), tiny)
        gap = max(x_quad + x_lin - float(grad.min()), 0.0)
        if gap <= tol * size or capped:
            break
        f = 0.5 * x_quad + x_lin
        improving = grad < x_quad + x_lin - tol * size
        improving[corral.S[corral.lam > 0.0]] = False
        cand = improving.nonzero()[0]
        if stalled or f >= f_prev or not len(cand):
            # Rounding in the bordered solves can stall above the rounding level: re-solve directly.
            if len(corral.D) and gap > 64 * tiny and corral.compact():
                stalled, f_prev = False, np.inf
                continue
            stalled = True
            break
        if not enter(corral, cand[np.argsort(grad[cand], kind="stable")], grad):
            stalled = True
            break
        f_prev = f
    weights = corral.weights()
    weights /= weights.sum()
    rel = gap / size
    converged = rel <= tol or (stalled and gap <= 64 * tiny)
    degenerate = "pareto_stationary" if not has_q and x_quad <= 16 * tiny else None
    return weights, MinNormInfo(iterations, rel, converged, degenerate)
