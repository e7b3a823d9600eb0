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
points are affinely independent, so one Cholesky factor of A (extended when points enter, partly
re-factored when they leave) gives x = (1 + 1^T A^-1 q_S) / (1^T A^-1 1) A^-1 1 - A^-1 q_S.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.linalg import lapack

from dist_mtl.balancers._arrays import ArrayLike, as_gramian, to_torch

EPS = float(np.finfo(np.float64).eps)
DEFAULT_TOL = 1e-10
DEFAULT_MAX_ITER = 10_000
_MIN_BATCH = 32  # vertices a major cycle may admit even when the corral is smaller
_DROP_ROUNDS = 8  # affine solves a minor cycle may spend dropping all non-positive weights at once
_SMALL = 64  # corrals up to this size are re-factored from scratch when points leave


@dataclass(frozen=True)
class MinNormInfo:
    """Diagnostics of one solve; `gap` is the Frank-Wolfe duality gap relative to the objective's size."""

    iterations: int
    gap: float
    converged: bool
    degenerate: str | None = None


def min_norm(
    M: ArrayLike, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER
) -> tuple[torch.Tensor, MinNormInfo]:
    """Simplex weights a minimising a^T M a, as a float64 (T,) tensor, and the solve's diagnostics.

    Stops when a^T M a - min_i (M a)_i <= tol * max(a^T M a, T eps) with M scaled to unit largest
    diagonal, or when floating point allows no further progress; `converged` then says whether the
    gap is at rounding level (64 T eps). `max_iter` caps the affine solves (the unit of work).
    `degenerate` names the special cases: single_task, zero_gramian, identical_tasks (T = 2) and
    pareto_stationary (the minimum norm is zero to working precision).
    """
    check_solver_options(tol, max_iter)
    weights, info = solve_min_norm(as_gramian(M), tol, max_iter)
    return to_torch(weights), info


def check_solver_options(tol: float, max_iter: int, prefix: str = "") -> None:
    """Reject a tolerance or iteration cap that cannot be met, naming the argument."""
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"{prefix}tol must be a finite number >= 0; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise ValueError(f"{prefix}max_iter must be an integer >= 1; got {max_iter!r}")


def solve_min_norm(
    M: np.ndarray, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER
) -> tuple[np.ndarray, MinNormInfo]:
    """NumPy core of `min_norm` for a symmetric float64 Gramian."""
    T = M.shape[0]
    if T == 1:
        return np.ones(1), MinNormInfo(0, 0.0, True, "single_task")
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:
        return np.full(T, 1.0 / T), MinNormInfo(0, 0.0, True, "zero_gramian")
    if T == 2:
        return _two_tasks(M / scale)
    return _wolfe(M / scale, np.zeros(T), tol, max_iter, ())


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
    return _wolfe(Q / scale, q / scale, tol, max_iter, init)


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
    Q: np.ndarray, q: np.ndarray, tol: float, max_iter: int, init: Sequence[int]
) -> tuple[np.ndarray, MinNormInfo]:
    """Wolfe's min-norm-point algorithm for Q scaled to unit largest diagonal (so c = 1 in A).

    Two deviations from the textbook, both keeping its termination argument (every accepted corral
    is an affine minimiser with positive weights and a strictly smaller objective, so none repeats):
    a major cycle admits up to max(32, n) improving vertices at once (most negative gradient first)
    instead of one; and when the affine minimiser has non-positive weights, a minor cycle first drops
    all of them at once (again on the smaller corral, up to _DROP_ROUNDS solves), falling back to the
    line search if that does not end on a positive, better minimiser. On T = 1000 Gramians with
    ~800 tasks in the support this takes ~30 affine solves instead of ~900.
    """
    T = Q.shape[0]
    tiny = T * EPS
    # Corral state in fixed buffers: S[:n] indices, lam[:n] weights, L[:n, :n] the Cholesky factor of
    # Q_SS + 1, rows[:n] = Q[S] so that the gradient lam @ rows[:n] + q is one contiguous gemv.
    S = np.empty(T, dtype=np.intp)
    lam = np.empty(T)
    rows = np.empty((T, T))
    has_q = bool(q.any())
    in_S = np.zeros(T, dtype=bool)
    L = np.zeros((min(T, 64),) * 2, order="F")
    start = int((0.5 * Q.diagonal() + q).argmin())
    S[0], rows[0], in_S[start], L[0, 0], n = start, Q[start], True, np.sqrt(Q[start, start] + 1.0), 1
    # Warm start: admit the seeds in one block, or one by one (skipping dependent ones) if that fails.
    seeds = np.unique(np.asarray(init, dtype=np.intp))
    blocks = [seeds[~in_S[seeds]]]
    while blocks:
        block = blocks.pop()
        if not len(block):
            continue
        grown = _cholesky_extend(L, n, rows[:n, block] + 1.0, Q[np.ix_(block, block)] + 1.0)
        if grown is None and len(block) > 1:
            blocks = [block[i : i + 1] for i in range(len(block) - 1, -1, -1)]
        elif grown is not None:
            k = len(block)
            L, S[n : n + k], rows[n : n + k], in_S[block] = grown, block, Q[block], True
            n += k
    lam[:n] = 1.0 / n
    iterations, stalled, capped, f_prev = 0, False, False, np.inf
    while True:
        # Minor cycles: move toward the corral's affine minimiser, dropping points whose weight hits 0.
        while True:
            if iterations >= max_iter:
                capped = True
                break
            iterations += 1
            alpha, _ = _affine_minimiser(L[:n, :n], q[S[:n]] if has_q else None)
            if not np.isfinite(alpha).all():  # only a numerically singular factor can do this
                stalled = True
                break
            if alpha.min() > 0.0:
                lam[:n] = alpha
                break
            spent, trial = _drop_nonpositive(
                L, n, rows, S, q if has_q else None, alpha, max_iter - iterations
            )
            iterations += spent
            if trial is not None and trial[2] < f_prev:
                n, L = _commit(L, n, S, lam, rows, in_S, trial[0], trial[1])
                break
            keep = _line_search(lam[:n], alpha)
            subset = _subset_factor(L, n, rows, S, keep, lam[:n])
            if subset is None:
                stalled = True
                break
            n, L = _commit(L, n, S, lam, rows, in_S, subset, lam[subset.positions])
        x, in_corral = lam[:n], S[:n]
        quad = x @ rows[:n]
        x_quad = float(x @ quad[in_corral])
        if has_q:
            grad, x_lin = quad + q, float(x @ q[in_corral])
        else:
            grad, x_lin = quad, 0.0
        size = max(x_quad + abs(x_lin), tiny)
        threshold = x_quad + x_lin - tol * size
        gap = max(x_quad + x_lin - float(grad.min()), 0.0)
        if gap <= tol * size or capped or stalled:
            break
        improving = grad < threshold
        improving[in_S] = False
        cand = improving.nonzero()[0]
        batch = max(n, _MIN_BATCH)
        if len(cand) > batch:
            cand = cand[np.argsort(grad[cand], kind="stable")[:batch]]
        f = 0.5 * x_quad + x_lin
        if f >= f_prev or not len(cand):
            stalled = True
            break
        new_rows = Q[cand]
        grown = _cholesky_extend(L, n, rows[:n, cand] + 1.0, new_rows[:, cand] + 1.0)
        if grown is None and len(cand) > 1:
            best = int(np.argmin(grad[cand]))
            cand, new_rows = cand[best : best + 1], new_rows[best : best + 1]
            grown = _cholesky_extend(L, n, rows[:n, cand] + 1.0, new_rows[:, cand] + 1.0)
        if grown is None:
            stalled = True
            break
        k = len(cand)
        L, S[n : n + k], lam[n : n + k], rows[n : n + k], in_S[cand] = grown, cand, 0.0, new_rows, True
        n, f_prev = n + k, f
    weights = np.zeros(T)
    weights[S[:n]] = lam[:n]
    weights /= weights.sum()
    rel = gap / size
    converged = rel <= tol or (stalled and gap <= 64 * tiny)
    degenerate = "pareto_stationary" if not has_q and x_quad <= 16 * tiny else None
    return weights, MinNormInfo(iterations, rel, converged, degenerate)


def _affine_minimiser(L: np.ndarray, q: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Minimiser of 1/2 x^T Q x + q^T x on {1^T x = 1} given the factor L of Q + 11^T, and its value.

    With y1 = A^-1 1, y2 = A^-1 q: x = t y1 - y2, t = (1 + 1^T y2) / 1^T y1, and Q x + q = (t - 1) 1,
    so the value is (t - 1 + q^T x) / 2 without another product with Q.
    """
    if q is None:
        y = lapack.dpotrs(L, np.ones(L.shape[0]), lower=1)[0]
        total = y.sum()
        return y / total, 0.5 * (1.0 / total - 1.0)
    y = lapack.dpotrs(L, np.column_stack([np.ones(L.shape[0]), q]), lower=1)[0]
    t = (1.0 + y[:, 1].sum()) / y[:, 0].sum()
    x = t * y[:, 0] - y[:, 1]
    return x, 0.5 * (t - 1.0 + float(q @ x))


def _drop_nonpositive(
    L: np.ndarray,
    n: int,
    rows: np.ndarray,
    S: np.ndarray,
    q: np.ndarray | None,
    alpha: np.ndarray,
    budget: int,
) -> tuple[int, tuple[_Subset, np.ndarray, float] | None]:
    """Drop every non-positive weight and re-solve, repeatedly (at most _DROP_ROUNDS affine solves).

    Returns the number of affine solves spent and, when it ends on positive weights, the kept
    subset, its weights and objective value. Nothing in the corral is modified.
    """
    keep, priority = alpha > 0.0, alpha.copy()
    for spent in range(1, min(_DROP_ROUNDS, budget) + 1):
        subset = _subset_factor(L, n, rows, S, keep, priority)
        if subset is None:
            return spent - 1, None
        weights, value = _affine_minimiser(subset.factor, None if q is None else q[S[subset.positions]])
        if weights.min() > 0.0:
            return spent, (subset, weights, value)
        keep[subset.positions[weights <= 0.0]] = False
        priority[subset.positions] = weights
    return min(_DROP_ROUNDS, budget), None


def _line_search(lam: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Step lam (in place) toward alpha until a weight hits 0; the mask of the positions that stay."""
    neg = (alpha <= 0.0).nonzero()[0]
    ratio = lam[neg] / np.maximum(lam[neg] - alpha[neg], np.finfo(np.float64).tiny)  # 0 where lam = 0
    theta = float(ratio.min())
    lam += theta * (alpha - lam)
    keep = np.ones(len(lam), dtype=bool)
    keep[neg[ratio <= theta]] = False
    return keep


def _cholesky_extend(L: np.ndarray, n: int, cross: np.ndarray, block: np.ndarray) -> np.ndarray | None:
    """Extend the factor L[:n, :n] of A = Q_SS + 1 by k points; None if one is affinely dependent.

    `cross` (n, k) and `block` (k, k) are the new columns of A. The buffer grows geometrically when
    full, so a call costs O(n^2 k) plus amortised copying.
    """
    k = block.shape[0]
    scale = block.diagonal()
    if n:
        cross, info = lapack.dtrtrs(L[:n, :n], cross, lower=1)
        if info != 0:
            return None
        block = block - cross.T @ cross
    factor, info = lapack.dpotrf(block, lower=1, clean=1)
    if info != 0 or not (factor.diagonal() ** 2 > 64 * EPS * max(n, 1) * scale).all():
        return None
    if n + k > L.shape[0]:
        grown = np.zeros((2 * (n + k),) * 2, order="F")
        grown[:n, :n] = L[:n, :n]
        L = grown
    L[n : n + k, :n] = cross.T
    L[n : n + k, n : n + k] = factor
    return L


class _Subset(NamedTuple):
    """A smaller corral: old positions in their new order, the first `first` of them unmoved."""

    positions: np.ndarray
    first: int
    factor: np.ndarray


def _subset_factor(
    L: np.ndarray, n: int, rows: np.ndarray, S: np.ndarray, keep: np.ndarray, priority: np.ndarray
) -> _Subset | None:
    """Cholesky factor of A restricted to the kept positions, without touching the corral's buffers.

    Rows before the first dropped position are unchanged; the rest is re-factored from the Schur
    complement. That part is free to reorder, so it is sorted by decreasing `priority` (the weights):
    the points most likely to leave next end up last, where removing them is cheap. None if rounding
    breaks definiteness.
    """
    first = int(np.argmin(keep))
    if n <= _SMALL:  # re-factoring everything is cheaper than the bookkeeping below
        first = 0
    tail = first + np.flatnonzero(keep[first:n])
    tail = tail[np.argsort(-priority[tail], kind="stable")]
    if not first:
        factor, info = lapack.dpotrf(rows.take(tail, axis=0).take(S[tail], axis=1) + 1.0, lower=1, clean=1)
        return _Subset(tail, 0, factor) if info == 0 else None
    m = first + len(tail)
    out = np.zeros((m, m), order="F")
    out[:first, :first] = L[:first, :first]
    if len(tail):
        lead = L[tail, :first]
        block = rows.take(tail, axis=0).take(S[tail], axis=1) + 1.0  # two takes beat one 2-d gather
        if first:
            block -= lead @ lead.T
        factor, info = lapack.dpotrf(block, lower=1, clean=1)
        if info != 0:
            return None
        out[first:, :first] = lead
        out[first:, first:] = factor
    return _Subset(np.concatenate([np.arange(first), tail]), first, out)


def _commit(
    L: np.ndarray,
    n: int,
    S: np.ndarray,
    lam: np.ndarray,
    rows: np.ndarray,
    in_S: np.ndarray,
    subset: _Subset,
    weights: np.ndarray,
) -> tuple[int, np.ndarray]:
    """Shrink the corral to `subset` with the given weights (in the subset's order)."""
    m, first, tail = len(subset.positions), subset.first, subset.positions[subset.first :]
    in_S[S[:n]] = False
    S[first:m], rows[first:m] = S[tail], rows[tail]
    in_S[S[:m]] = True
    lam[:m] = weights / weights.sum()
    L[:m, :m] = subset.factor
    return m, L
