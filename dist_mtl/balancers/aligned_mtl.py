"""Aligned-MTL (Senushkin et al., CVPR 2023, "Independent component alignment for multi-task learning").

Algorithm 1 on the Gramian: M = V diag(lambda) V^T; the aligned gradients G B, with
B = sqrt(s) V_r diag(lambda_r)^(-1/2) V_r^T on the r eigenvalues above the rank tolerance, have
Gramian B M B = s V_r V_r^T: all r singular values equal sqrt(s), condition number 1. The direction is
the mean of the aligned gradients, d = G B 1/T, so c = B 1 / T.

s by `scale_mode`, as in the authors' code and TorchJD's AlignedMTLWeighting: `min` the smallest
retained eigenvalue (the paper), `median` the median retained eigenvalue (torch.median's lower median
for an even count), `rmse` their mean (the mean squared singular value of G). Rank tolerance, the
authors' and TorchJD's: eigenvalues <= lambda_max * T * eps are dropped (a pseudo-inverse square root),
so zero and rounding-level eigenvalues (duplicate tasks, rank-deficient G) never divide; if all are
dropped (M = 0) B = I. The authors' code sums the aligned gradients (c = B 1); the mean here matches
TorchJD's default preference vector and the other balancers' scale (a factor T in the learning rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from dist_mtl.balancers.base import Balancer

SCALE_MODES = ("min", "median", "rmse")
EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class AlignedMTL(Balancer):
    """c = B 1 / T with B the balance transformation for `scale_mode` (see the module doc)."""

    scale_mode: str = "min"

    name = "aligned_mtl"

    def __post_init__(self) -> None:
        if self.scale_mode not in SCALE_MODES:
            valid = ", ".join(SCALE_MODES)
            raise ValueError(f"balancer.scale_mode must be one of {valid}; got {self.scale_mode!r}")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        T = M.shape[0]
        coefficients, rank, scale, condition = aligned_coefficients(M, np.full(T, 1.0 / T), self.scale_mode)
        info = {
            "aligned_mtl_rank": float(rank),
            "aligned_mtl_scale": scale,
            "aligned_mtl_condition": condition,  # of M on its retained range
        }
        return coefficients, info


def aligned_coefficients(
    M: np.ndarray, pref: np.ndarray, scale_mode: str
) -> tuple[np.ndarray, int, float, float]:
    """B pref, with the rank r, the scale s and M's condition number on the retained eigenvalues.

    B itself is never formed: B pref = V_r (sqrt(s / lambda_r) * (V_r^T pref)) costs O(T r) after the
    eigendecomposition (LAPACK's relatively robust driver above 200 tasks, where it is fastest).
    """
    T = M.shape[0]
    if T >= 200:
        lam, V = scipy.linalg.eigh(M, check_finite=False, driver="evr")
    else:
        lam, V = np.linalg.eigh(M)
    top = float(lam[-1])
    first = int(np.searchsorted(lam, top * T * EPS, side="right"))  # ascending: the retained are a suffix
    rank = T - first
    if rank == 0:
        return pref.copy(), 0, 0.0, 0.0
    lam, V = lam[first:], V[:, first:]
    if scale_mode == "min":
        s = float(lam[0])
    elif scale_mode == "median":
        s = float(lam[(rank - 1) // 2])
    else:
        s = float(lam.mean())
    return V @ (np.sqrt(s / lam) * (pref @ V)), rank, s, top / float(lam[0])
