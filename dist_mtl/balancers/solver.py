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

import numpy as np
import torch
from scipy.linalg import lapack

from dist_mtl.balancers._arrays import ArrayLike, as_gramian, to_torch

EPS = float(np.finfo(np.float64).eps)
DEFAULT_TOL = 1e-10
DEFAULT_MAX_ITER = 10_000
_MIN_BATCH = 64  # vertices a major cycle may admit even when the corral is smaller
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
    return _wolfe(M, scale, np.zeros(T), tol, max_iter, ())


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
    Q: np.ndarray, scale: float, q: np.ndarray, tol: float, max_iter: int, init: Sequence[int]
) -> tuple[np.ndarray, MinNormInfo]:
    """Wolfe's min-norm-point algorithm for Q / scale, which has unit largest diagonal (so c = 1 in A).

    Q is read, never copied: the division by `scale` happens on the blocks and products used.

    Two deviations from the textbook, both keeping its termination argument (every accepted corral
    is an affine minimiser with positive weights and a strictly smaller objective, so none repeats):
    a major cycle admits up to max(_MIN_BATCH, n) improving vertices at once (most negative gradient
    first) instead of one; and when the affine minimiser has non-positive weights, a minor cycle
    first drops all of them at once (again on the smaller corral, up to _DROP_ROUNDS solves), falling
    back to the line search if that does not end on a positive, better minimiser. On T = 1000
    Gramians with ~800 tasks in the support this takes ~40 affine solves instead of ~900; `_Corral`
    keeps each of them at O(n^2) once the corral is large.
    """
    T = Q.shape[0]
    tiny = T * EPS
    has_q = bool(q.any())
    corral = _Corral(Q, scale, q if has_q else None, int((0.5 * Q.diagonal() / scale + q).argmin()))
    seeds = np.unique(np.asarray(init, dtype=np.intp))
    seeds = seeds[seeds != corral.S[0]]
    while len(seeds):  # warm start: admit the seeds, skipping any that is affinely dependent
        k = corral.extend(seeds)
        seeds = seeds[k + 1 :]
    if len(corral.S) > 1:
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
            # Drop every non-positive weight at once and re-solve, a few rounds; keep it if that ends
            # on positive weights and a better value, otherwise undo it and do Wolfe's line search.
            saved, trial = corral.state(), None
            for _ in range(min(_DROP_ROUNDS, max_iter - iterations)):
                if not corral.drop(out, alpha):
                    break
                iterations += 1
                trial, value = corral.affine()
                out = corral.nonpositive(trial)
                if out is None or not len(out):
                    break
            if out is None and value < f_prev:
                corral.lam = trial
                break
            corral.restore(saved)
            lam, neg = corral.lam, corral.nonpositive(alpha)
            ratio = lam[neg] / np.maximum(lam[neg] - alpha[neg], np.finfo(np.float64).tiny)
            theta = float(ratio.min())
            lam += theta * (alpha - lam)
            if not corral.drop(neg[ratio <= theta], lam):
                stalled = True
                break
        S, lam = corral.S, corral.lam
        w = np.zeros(T)
        w[S] = lam
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
        improving[S[lam > 0.0]] = False
        cand = improving.nonzero()[0]
        if stalled or f >= f_prev or not len(cand):
            # Rounding in the bordered solves can stall above the rounding level: re-solve directly.
            if len(corral.D) and gap > 64 * tiny and corral.compact():
                stalled, f_prev = False, np.inf
                continue
            stalled = True
            break
        cand = cand[np.argsort(grad[cand], kind="stable")[: max(len(S) - len(corral.D), _MIN_BATCH)]]
        if not corral.admit(cand):
            stalled = True
            break
        f_prev = f
    weights = np.zeros(T)
    weights[corral.S] = corral.lam
    weights /= weights.sum()
    rel = gap / size
    converged = rel <= tol or (stalled and gap <= 64 * tiny)
    degenerate = "pareto_stationary" if not has_q and x_quad <= 16 * tiny else None
    return weights, MinNormInfo(iterations, rel, converged, degenerate)


class _Corral:
    """The corral as a base set B (task indices S, Cholesky factor L of A_B = Q_BB / scale + 11^T) minus the
    positions D of points that left it, with weights `lam` over B (exactly 0 on D).

    Up to _SMALL points, D stays empty and L is simply re-computed (lazily, L = None until the next
    solve) whenever the corral changes: a few LAPACK calls beat any bookkeeping. Beyond that,
    re-factoring after a drop would cost O(n^3), so a point at position p that leaves becomes the
    constraint x_p = 0 of the affine solve on B: with W = L^-1 E_D and K the Cholesky factor of
    W^T W = (A_B^-1)_DD, the solution of A_C u_C = r_C is u = A_B^-1 (r - E_D mu) with
    mu = K^-T K^-1 (A_B^-1 r)_D: two triangular solves on L and O(n d) more per affine solve, O(n^2)
    per dropped point. When D outgrows half of B, or rounding asks for it, B is re-factored as B \\ D.
    """

    __slots__ = ("Q", "scale", "q", "S", "L", "lam", "D", "W", "K")

    def __init__(self, Q: np.ndarray, scale: float, q: np.ndarray | None, start: int) -> None:
        self.Q, self.scale, self.q = Q, scale, q
        self.S = np.array([start], dtype=np.intp)
        self.L = np.sqrt(np.array([[Q[start, start] / scale + 1.0]]))
        self.lam = np.ones(1)
        self._clear()

    def _clear(self) -> None:
        self.D = _NO_POSITIONS
        self.W = self.K = None

    def _gather(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """A = Q / scale + 11^T restricted to rows x cols (two takes beat one 2-d gather)."""
        block = self.Q.take(rows, axis=0).take(cols, axis=1)
        block /= self.scale
        block += 1.0
        return block

    def state(self) -> tuple:
        return self.S, self.L, self.lam, self.D, self.W, self.K

    def restore(self, state: tuple) -> None:
        self.S, self.L, self.lam, self.D, self.W, self.K = state
        self.lam = self.lam.copy()

    def nonpositive(self, alpha: np.ndarray) -> np.ndarray | None:
        """Corral positions where alpha <= 0 (an empty array if alpha has NaN), None if there are none."""
        if not len(self.D):
            low = float(alpha.min())
            if low > 0.0:
                return None
            return (alpha <= 0.0).nonzero()[0] if low <= 0.0 else _NO_POSITIONS
        out = alpha <= 0.0
        out[self.D] = False
        if out.any():
            return out.nonzero()[0]
        return None if np.isfinite(alpha).all() else _NO_POSITIONS

    def _solve(self, r: np.ndarray) -> np.ndarray:
        """A_C^-1 r_C on the positions of B, 0 on D (L must be factored)."""
        u = lapack.dpotrs(self.L, r, lower=1)[0]
        if len(self.D):
            mu = lapack.dpotrs(self.K, u[self.D], lower=1)[0]
            u -= lapack.dtrtrs(self.L, self.W @ mu, lower=1, trans=1)[0]
            u[self.D] = 0.0
        return u

    def affine(self) -> tuple[np.ndarray, float]:
        """Minimiser of 1/2 x^T Q x + q^T x on the corral's affine hull, and its value.

        With y1 = A^-1 1, y2 = A^-1 q: x = t y1 - y2, t = (1 + 1^T y2) / 1^T y1, and Q x + q = (t - 1) 1,
        so the value is (t - 1 + q^T x) / 2 without another product with Q.
        """
        if self._factor() is None:
            nan = np.full(len(self.S), np.nan)
            return nan, np.nan
        n = len(self.S)
        if self.q is None:
            y = self._solve(np.ones(n))
            total = y.sum()
            return y / total, 0.5 * (1.0 / total - 1.0)
        q = self.q[self.S]
        q[self.D] = 0.0
        y = self._solve(np.column_stack([np.ones(n), q]))
        t = (1.0 + y[:, 1].sum()) / y[:, 0].sum()
        x = t * y[:, 0] - y[:, 1]
        return x, 0.5 * (t - 1.0 + float(q @ x))

    def drop(self, P: np.ndarray, priority: np.ndarray) -> bool:
        """Remove positions P from the corral (lam there set to 0, the rest renormalised); False if
        rounding breaks definiteness. `priority` orders any re-factored part (see `_refactor`)."""
        lam = self.lam.copy()
        lam[P] = 0.0
        total = lam.sum()
        self.lam = lam / total if total > 0.0 else lam  # a trial may drop all; its caller undoes it
        n, d, k = len(self.S), len(self.D), len(P)
        if n - d - k <= _SMALL or 2 * (d + k) > n:
            keep = np.ones(n, dtype=bool)
            keep[P] = False
            keep[self.D] = False
            return self._refactor(keep, priority)
        E = np.zeros((n, k), order="F")
        E[P, np.arange(k)] = 1.0
        w = lapack.dtrtrs(self.L, E, lower=1, overwrite_b=1)[0]
        block = w.T @ w
        if d:
            cross = lapack.dtrtrs(self.K, self.W.T @ w, lower=1)[0]
            block -= cross.T @ cross
        factor, info = lapack.dpotrf(block, lower=1, clean=1)
        if info:
            keep = np.ones(n, dtype=bool)
            keep[P] = False
            keep[self.D] = False
            return self._refactor(keep, priority)
        K = np.zeros((d + k, d + k), order="F")
        if d:
            K[:d, :d] = self.K
            K[d:, :d] = cross.T
            w = np.hstack([self.W, w])
        K[d:, d:] = factor
        self.K, self.W, self.D = K, w, np.concatenate([self.D, P])
        return True

    def compact(self) -> bool:
        """Re-factor on B \\ D; False if rounding breaks definiteness (the state is then unchanged)."""
        keep = np.ones(len(self.S), dtype=bool)
        keep[self.D] = False
        return self._refactor(keep, self.lam)

    def _refactor(self, keep: np.ndarray, priority: np.ndarray) -> bool:
        """B := the kept positions (lam must be 0 on the others); False if rounding breaks definiteness.

        A small B is left to the next solve to factor. Otherwise positions before the first dropped one
        keep their rows of L, and the rest is re-factored from the Schur complement, sorted by
        decreasing `priority` (the weights) so that the points most likely to leave next end up last,
        where removing them is cheap.
        """
        lam = self.lam
        if np.count_nonzero(keep) <= _SMALL:
            self.S, self.L, self.lam = self.S[keep], None, lam[keep]
            self._clear()
            return True
        L = self.L  # factored: B is large
        first = int(np.argmin(keep))
        tail = first + np.flatnonzero(keep[first:])
        tail = tail[np.argsort(-priority[tail], kind="stable")]
        idx = self.S[tail]
        block = self._gather(idx, idx)
        if first:
            lead = L[tail, :first]
            block -= lead @ lead.T
        factor, info = lapack.dpotrf(block, lower=1, clean=1, overwrite_a=1)
        if info:
            return False
        m = first + len(tail)
        if first:
            L_new = np.empty((m, m), order="F")
            L_new[:first, :first] = L[:first, :first]
            L_new[:first, first:] = 0.0
            L_new[first:, :first] = lead
            L_new[first:, first:] = factor
            tail = np.concatenate([np.arange(first), tail])
        else:
            L_new = factor
        self.S, self.L, self.lam = self.S[tail], L_new, lam[tail]
        self._clear()
        return True

    def _factor(self) -> np.ndarray | None:
        """L, computed first if a small corral changed since it was last factored; None if singular."""
        while self.L is None:
            L, info = lapack.dpotrf(self._gather(self.S, self.S), lower=1, clean=1)
            if not info:
                self.L = L
                break
            # Factoring in another order can round a tiny pivot that `extend` accepted to <= 0; such
            # a point has just entered (weight 0) and can go. Otherwise the corral is singular.
            p = info - 1
            if self.lam[p] > 0.0:
                return None
            keep = np.arange(len(self.S)) != p
            self.S, self.lam = self.S[keep], self.lam[keep]
        return self.L

    def admit(self, cand: np.ndarray) -> bool:
        """Bring improving vertices into the corral with weight 0: dropped ones back from D, new ones
        by extending B (the leading ones that keep L safely definite). False if none could enter."""
        if len(self.D):
            pos = np.full(self.Q.shape[0], -1, dtype=np.intp)
            pos[self.S] = np.arange(len(self.S))
            back = pos[cand]
            back = back[back >= 0]
            if len(back):
                keep = ~np.isin(self.D, back)
                self.D, self.W = self.D[keep], self.W[:, keep]
                if not len(self.D):
                    self._clear()
                elif not self._refactor_K():
                    return self.compact() and self.admit(cand)
                cand = cand[pos[cand] < 0]
                if not len(cand):
                    return True
        if self.extend(cand):
            return True
        return bool(len(self.D)) and self.compact() and self.extend(cand) > 0

    def _refactor_K(self) -> bool:
        factor, info = lapack.dpotrf(self.W.T @ self.W, lower=1, clean=1)
        self.K = factor
        return info == 0

    def extend(self, idx: np.ndarray) -> int:
        """Add the tasks idx (in order) to B with weight 0, as many leading ones as keep the factor
        safely definite; returns how many entered. O(n^2 k) plus one O(n^2) copy of L."""
        n, k = len(self.S), len(idx)
        if n + k <= _SMALL:  # factor the whole corral again: fewer calls than extending
            S = np.concatenate([self.S, idx])
            A = self._gather(S, S)
            factor, info = lapack.dpotrf(A, lower=1, clean=1)
            if 0 < info <= n:  # the corral itself rounds to singular: nothing can enter
                return 0
            j = _good_pivots(factor[n:, n:], info - n if info else 0, A.diagonal()[n:], n)
            if j:
                self.S, self.L = S[: n + j], factor if j == k else None
                self.lam = np.concatenate([self.lam, np.zeros(j)])
            return j
        L = self._factor()
        if L is None:
            return 0
        n = len(self.S)
        block = self._gather(idx, idx)
        scale = block.diagonal().copy()
        cross = self._gather(idx, self.S).T  # Q is symmetric; the transpose is Fortran-ordered
        cross = lapack.dtrtrs(L, cross, lower=1, overwrite_b=1)[0]
        block -= cross.T @ cross
        factor, info = lapack.dpotrf(block, lower=1, clean=1)
        j = _good_pivots(factor, info, scale, n)
        if j == 0:
            return 0
        if j < k:
            cross, idx = cross[:, :j], idx[:j]
            factor = lapack.dpotrf(block[:j, :j], lower=1, clean=1)[0]
        L_new = np.empty((n + j, n + j), order="F")  # every block written: no zero-fill of n^2
        L_new[:n, :n] = L
        L_new[:n, n:] = 0.0
        L_new[n:, :n] = cross.T
        L_new[n:, n:] = factor
        self.S, self.L = np.concatenate([self.S, idx]), L_new
        self.lam = np.concatenate([self.lam, np.zeros(j)])
        if len(self.D):
            W = np.empty((n + j, len(self.D)), order="F")
            W[:n] = self.W
            W[n:] = lapack.dtrtrs(factor, cross.T @ self.W, lower=1)[0]
            W[n:] *= -1.0
            self.W = W
            if not self._refactor_K():
                self.compact()
        return j


_NO_POSITIONS = np.empty(0, dtype=np.intp)


def _good_pivots(factor: np.ndarray, info: int, scale: np.ndarray, n: int) -> int:
    """How many leading pivots of a (possibly failed, info > 0) Cholesky factor are safely positive:
    the i-th pivot squared must exceed 64 eps (n + i + 1) times its diagonal entry of A, with n the
    number of points already factored."""
    k = factor.shape[0] if info <= 0 else info - 1
    bad = ~(factor.diagonal()[:k] ** 2 > 64 * EPS * np.arange(n + 1, n + k + 1) * scale[:k])
    return int(bad.argmax()) if bad.any() else k
