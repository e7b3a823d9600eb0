"""PCGrad (Yu et al., NeurIPS 2020, "Gradient surgery for multi-task learning"), Algorithm 1.

For each task i: g'_i = g_i; for j in a random order of the other tasks, if <g'_i, g_j> < 0,
g'_i <- g'_i - <g'_i, g_j> / ||g_j||^2 g_j (the projection onto the normal plane of g_j). Then
d = sum_i g'_i (the paper's Delta theta = sum_i g_i^PC, as TorchJD's PCGradWeighting; not the mean).

Orders: Algorithm 1 draws the order inside the loop over i, so every task has its own order (as
TorchJD does, one torch.randperm per task); the TensorFlow release shuffles the tasks once and projects
every task in that shared order, itself included. Here each task has its own order, drawn from a
generator that is a pure function of (seed, step) (`mamg.task_orders`): identical on every rank and
restorable from a checkpoint. A call reads `step` and never changes it; the caller advances it once per
adopted step (`Balancer.advance`), as for MAMG.

Every g'_i stays a combination of the original gradients, g'_i = G b_i with b_i = e_i - sum of
<g'_i, g_j> / M_jj e_j over its projections, so the method is a T x T coefficient matrix evolving on M,
and c = sum_i b_i. The T sequences are independent and run in lockstep: at position r every task
looks at its own r-th partner and all projections of that round are one vectorised update. Inner
products come from one product B M per block of rounds and, inside a block, from entries of M
(`project_coefficients`), so the method is O(T^3): about 2 s at T = 1000 with ~40% conflicting pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.mamg import task_orders
from dist_mtl.balancers.seeded import SeededSteps


def project_coefficients(
    M: np.ndarray, orders: np.ndarray, block: int | None = None
) -> tuple[np.ndarray, int]:
    """Rows b_i with g'_i = G b_i after all projections (row i of `orders`: task i's partners, in order).

    Also returns the number of projections (conflicts met). `orders` may be any (T, K) array of
    partner indices, e.g. a prefix of the full orders. The rounds run in blocks of `block` (default
    max(64, T // 10)): at a block's start one product B M gives every task's inner products with its
    partners in the block; inside it, a projection onto g_j updates only the task's later partners in
    the block (entries of row j of M). This trades T^2-sized row updates for one GEMM per block.
    """
    T = M.shape[0]
    K = block or max(64, T // 10)
    rows = np.arange(T)[:, None]
    diag = np.diag(M)
    B = np.eye(T)
    projections = 0
    for start in range(0, orders.shape[1], K):
        partners = orders[:, start : start + K]
        W = (M if start == 0 else B @ M)[rows, partners]  # W[i, r] = <g'_i, g_partner> so far
        for r in range(partners.shape[1]):
            inner = W[:, r]
            hit = np.flatnonzero(inner < 0.0)
            if not len(hit):
                continue
            j = partners[hit, r]
            step = -inner[hit] / diag[j]
            B[hit, j] += step
            projections += len(hit)
            later = partners[hit, r + 1 :]
            if later.shape[1]:
                W[hit, r + 1 :] += step[:, None] * M[j[:, None], later]
    return B, projections


@dataclass
class PCGrad(SeededSteps, Balancer):
    """Sum of the projected gradients with the orders for (seed, step); `advance` moves to the next step."""

    name = "pcgrad"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        B, projections = project_coefficients(M, task_orders(M.shape[0], self.seed, self.step))
        return B.sum(axis=0), {"pcgrad_projections": float(projections)}
