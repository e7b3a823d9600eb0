"""MGDA (Sener & Koltun 2018, seed 004): the min-norm element of the convex hull of the task gradients.

Optional gradient normalisation n_t before the solve, all computable from M and the losses:
none (the paper, n_t = 1), l2 (||g_t|| = sqrt(M_tt)), loss (L_t), loss+ (L_t ||g_t||). The solve runs
on the normalised Gramian M_n = D^-1 M D^-1 (D = diag(n)) and gives simplex weights a.

`apply="adopted"` (default) returns c_t = a_t / n_t, so d = sum_t a_t g_t / n_t is the min-norm
element of the normalised gradients. `apply="official"` returns c_t = a_t: the official code solves on
the normalised gradients but then scales the raw losses by a_t, which is neither the min-norm direction
of the raw nor of the normalised gradients when the n_t differ. It is offered to reproduce that code.
With normalization="none" the two coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer, solver_info
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, check_solver_options, solve_min_norm

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_MODES = ("adopted", "official")
# A normaliser below this fraction of the largest is clamped to it: a zero gradient (l2) stays zero
# after normalisation, and a zero or negative loss (loss, loss+) gets a long normalised gradient that
# the min-norm solve avoids, the limit of n_t -> 0, instead of a division by zero or a sign flip.
NORM_FLOOR = 1e-12


def gradient_normalizers(M: np.ndarray, losses: np.ndarray | None, kind: str) -> tuple[np.ndarray, int]:
    """The normalisers n_t for `kind` and how many were clamped to the floor."""
    norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
    if kind == "none":
        return np.ones(M.shape[0]), 0
    if kind == "l2":
        raw = norms
    elif kind == "loss":
        raw = np.asarray(losses, dtype=np.float64)
    else:
        raw = np.asarray(losses, dtype=np.float64) * norms
    top = float(raw.max())
    if not top > 0.0:
        return np.ones(M.shape[0]), M.shape[0]
    floor = NORM_FLOOR * top
    clamped = raw < floor
    return np.where(clamped, floor, raw), int(clamped.sum())


@dataclass(frozen=True)
class MGDA(Balancer):
    """Min-norm weights on the (optionally normalised) Gramian; see the module doc for `apply`."""

    normalization: str = "none"
    apply: str = "adopted"
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    name = "mgda"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            valid = ", ".join(NORMALIZATIONS)
            raise ValueError(f"balancer.normalization must be one of {valid}; got {self.normalization!r}")
        if self.apply not in APPLY_MODES:
            raise ValueError(f"balancer.apply must be one of {', '.join(APPLY_MODES)}; got {self.apply!r}")
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    @property
    def needs_losses(self) -> bool:
        return self.normalization in ("loss", "loss+")

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        n, clamped = gradient_normalizers(M, losses, self.normalization)
        a, solve = solve_min_norm(M / np.outer(n, n), self.tol, self.max_iter)
        coefficients = a / n if self.apply == "adopted" else a
        info = solver_info("solver", solve.iterations, solve.gap, solve.converged)
        info["degenerate_zero_norm"] = float(clamped)
        info["degenerate_pareto_stationary"] = float(solve.degenerate == "pareto_stationary")
        return coefficients, info
