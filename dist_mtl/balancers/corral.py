"""The factored corral of the min-norm solver: the data structure that keeps large active sets cheap.

`solver.py` runs Wolfe's algorithm on a corral S (task indices) with weights `lam`; every affine solve
there needs A_S^-1 for A_S = Q_SS / scale + 11^T. This module keeps that factor current as the corral
changes, at O(n^2) per change once n is large instead of an O(n^3) re-factor:

- batched extension: k entering vertices cost one O(n^2 k) block update of the Cholesky factor, and
  only the leading ones whose pivots are safely positive enter (`good_pivots`);
- constraint-based drops: above _SMALL points, a point that leaves stays in the factored base set B as
  a constraint x_p = 0 of the affine solve (see `Corral`), re-factored away only when D outgrows B / 2;
- lazy refactor: up to _SMALL points, any change just forgets the factor, and the next solve computes
  it again (a few LAPACK calls beat any bookkeeping at that size);
- a dependence test (`Corral.dependent`) for vertices that cannot enter because they are affine
  combinations of the corral to working precision; `large_t.exchange` swaps them in instead.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

EPS = float(np.finfo(np.float64).eps)
_SMALL = 64  # corrals up to this size are re-factored from scratch when points leave
_NO_POSITIONS = np.empty(0, dtype=np.intp)


class Corral:
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

    def weights(self) -> np.ndarray:
        """The simplex point as a length-T vector (0 off the corral and on D)."""
        w = np.zeros(self.Q.shape[0])
        w[self.S] = self.lam
        return w

    def dependent(self, idx: np.ndarray) -> np.ndarray:
        """Mask of the tasks idx (none of them in the corral) that are affine combinations of the corral
        to working precision: their own pivot A_ii - ||L^-1 A_Si||^2 fails the test of `good_pivots`.

        Re-factors B \\ D first when points left as constraints (this runs only when no vertex could
        enter, so the O(n^3) is off the fast path); all False if rounding breaks definiteness.
        """
        none = np.zeros(len(idx), dtype=bool)
        if len(self.D) and not self.compact():
            return none
        L = self._factor()
        if L is None:
            return none
        diag = self.Q[idx, idx] / self.scale + 1.0
        cross = lapack.dtrtrs(L, self._gather(self.S, idx), lower=1, overwrite_b=1)[0]
        pivots = diag - np.einsum("ij,ij->j", cross, cross)
        return ~(pivots > 64 * EPS * (len(self.S) + 1) * diag)

    def admit(self, cand: np.ndarray) -> bool:
        """Bring improving vertices into the corral with weight 0: dropped ones back from D, new ones
        by extending B (the leading ones that keep L safely definite). False if none could enter."""
        came_back = False
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
                elif not self._refactor_K() and not self.compact():
                    return False
                came_back = True
                cand = cand[pos[cand] < 0]
                if not len(cand):
                    return True
        if self.extend(cand) or came_back:  # one improving vertex more is progress enough
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
            j = good_pivots(factor[n:, n:], info - n if info else 0, A.diagonal()[n:], n)
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
        j = good_pivots(factor, info, scale, n)
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


def good_pivots(factor: np.ndarray, info: int, scale: np.ndarray, n: int) -> int:
    """How many leading pivots of a (possibly failed, info > 0) Cholesky factor are safely positive:
    the i-th pivot squared must exceed 64 eps (n + i + 1) times its diagonal entry of A, with n the
    number of points already factored."""
    k = factor.shape[0] if info <= 0 else info - 1
    bad = ~(factor.diagonal()[:k] ** 2 > 64 * EPS * np.arange(n + 1, n + k + 1) * scale[:k])
    return int(bad.argmax()) if bad.any() else k
