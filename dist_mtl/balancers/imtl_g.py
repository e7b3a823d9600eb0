"""IMTL-G (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning"), the gradient part.

The paper asks for d = sum_i a_i g_i, sum_i a_i = 1, with equal projections onto every unit gradient
u_i = g_i / ||g_i||: <d, u_i> = (M a)_i / n_i the same for all i (n_i = ||g_i||). Its closed form
a_{2:T} = g_1 U^T (D U^T)^-1 (differences to the last task) is, on M, a = M^-1 n / 1^T M^-1 n.

Reading adopted: TorchJD's IMTLGWeighting, the generalisation of Quinton & Rey 2024 to linearly
dependent gradients: v = M^+ n (pseudo-inverse; eigenvalues below T eps times the largest, in absolute
value, count as zero, torch.linalg.pinv's default cut-off) and c = v / 1^T v; c = 0 when 1^T v
vanishes (`degenerate_zero_sum`). Computed on M / max diag (c is scale invariant), and the zero-sum
test is relative (|1^T v| <= T eps ||v||_1) where TorchJD's is absolute (|1^T v| < 1e-12), which makes
its answer depend on the gradients' scale. Logged: `imtl_g_rank` (eigenvalues kept) and
`imtl_g_residual`, ||M v - n|| / ||n||: 0 when n lies in the range of M, else the equal-projection
condition holds only in the least-squares sense.

Two routes to the same v. Where M is clearly of full rank, M^+ = M^-1 and v is one Cholesky solve
(LAPACK dpotrf, dpotrs; with the check below, an eighth of an eigendecomposition's time at T = 40).
"Clearly": the factorisation succeeds and LAPACK's estimate of ||M^-1||_1 (dpocon, on M scaled to unit
largest diagonal, so that lambda_max <= T) is below 1 / (_MARGIN T^2 eps). Since lambda_min >=
1 / ||M^-1||_1 for a symmetric M, that puts lambda_min above T eps lambda_max (every eigenvalue kept)
even if the estimate, a lower bound that is in practice within a small factor, were _MARGIN times too
small. Otherwise (rank deficient, near-duplicate tasks, norms over many decades, an indefinite M from
float32 accumulation) the eigendecomposition applies the cut-off itself. The Cholesky route is also the
more accurate one: backward stable, where the eigendecomposition (and TorchJD's SVD) lose up to
cond(M) eps in c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg.lapack import dpocon, dpotrf, dpotrs

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.solver import EPS

_MARGIN = 1e4  # how far the ||M^-1||_1 estimate may fall short before the Cholesky route is wrong


@dataclass(frozen=True)
class IMTLG(Balancer):
    """c = M^+ n / 1^T M^+ n with n_i = ||g_i|| (module doc)."""

    name = "imtl_g"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        d = M.diagonal()
        top = float(d.max())
        if not top > 0.0:
            return np.zeros(T), {"imtl_g_rank": 0.0, "imtl_g_residual": 0.0, "degenerate_zero_sum": 1.0}
        Mn = M * (1.0 / top)
        n = np.sqrt(np.maximum(d * (1.0 / top), 0.0))
        v, rank = _solve_full_rank(Mn, n)
        if v is None:
            v, rank = _solve_pinv(Mn, n)
        r = Mn @ v
        r -= n
        residual = math.sqrt(float(r.dot(r)) / float(n.dot(n)))
        total = float(v.sum())
        info = {"imtl_g_rank": float(rank), "imtl_g_residual": residual, "degenerate_zero_sum": 0.0}
        if not abs(total) > T * EPS * float(np.abs(v).sum()):
            info["degenerate_zero_sum"] = 1.0
            return np.zeros(T), info
        v /= total
        return v, info


def _solve_full_rank(Mn: np.ndarray, n: np.ndarray) -> tuple[np.ndarray | None, int]:
    """v = Mn^-1 n by Cholesky where Mn (unit largest diagonal) is clearly of full rank; (None, 0)
    otherwise (module doc)."""
    T = Mn.shape[0]
    factor, info = dpotrf(Mn, lower=0, clean=0)  # Mn is symmetric: the upper triangle is the lower one
    if info != 0:
        return None, 0
    rcond, info = dpocon(factor, 1.0)  # 1 / (estimate of ||Mn^-1||_1), as anorm = 1
    if info != 0 or not rcond > _MARGIN * T * T * EPS:
        return None, 0
    v, info = dpotrs(factor, n)
    return (v, T) if info == 0 else (None, 0)


def _solve_pinv(Mn: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, int]:
    """v = Mn^+ n with torch.linalg.pinv's cut-off (module doc), by one eigendecomposition."""
    T = Mn.shape[0]
    evals, evecs = np.linalg.eigh(Mn)
    kept = np.abs(evals) > T * EPS * float(np.abs(evals).max())
    inverse = np.divide(1.0, evals, out=np.zeros(T), where=kept)
    return evecs @ (inverse * (evecs.T @ n)), int(kept.sum())
