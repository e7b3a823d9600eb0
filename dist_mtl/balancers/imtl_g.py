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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.solver import EPS


@dataclass(frozen=True)
class IMTLG(Balancer):
    """c = M^+ n / 1^T M^+ n with n_i = ||g_i|| (module doc)."""

    name = "imtl_g"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
        top = float(norms.max())
        if top == 0.0:
            return np.zeros(T), {"imtl_g_rank": 0.0, "imtl_g_residual": 0.0, "degenerate_zero_sum": 1.0}
        Mn, n = M / top**2, norms / top
        evals, evecs = np.linalg.eigh(Mn)
        kept = np.abs(evals) > T * EPS * float(np.abs(evals).max())
        inverse = np.divide(1.0, evals, out=np.zeros(T), where=kept)
        v = evecs @ (inverse * (evecs.T @ n))
        residual = float(np.linalg.norm(Mn @ v - n) / np.linalg.norm(n))
        total = float(v.sum())
        info = {"imtl_g_rank": float(kept.sum()), "imtl_g_residual": residual, "degenerate_zero_sum": 0.0}
        if not abs(total) > T * EPS * float(np.abs(v).sum()):
            info["degenerate_zero_sum"] = 1.0
            return np.zeros(T), info
        return v / total, info
