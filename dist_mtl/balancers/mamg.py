"""MAMG (Chai et al., IEEE TCYB 2022, seed 002): pairwise clipping of conflicting task gradients.

Algorithm 1 with Eq. 2-4. For each task i: g'_i = g_i; for j in a random order of the other tasks,
if <g'_i, g_j> < 0, with P = g'_i - g_j and Delta = | ||g'_i||^2 - ||g_j||^2 | / ||P||,
g'_i <- g'_i - Delta P / ||P||. Then d = (1/T) sum_i g'_i.

Delta equals | ||g'_i|| cos(g'_i, P) - ||g_j|| cos(g_j, -P) |, the quantity in the authors' code. The
update is g'_i <- (1 - tau) g'_i + tau g_j with tau = Delta / ||P|| in [0, 1), so a clip (tau > 0)
strictly raises <g'_i, g_j>, and g'_i stays a combination of the original gradients: g'_i = G b_i, and
the method is a T x T coefficient matrix evolving on M alone, with c = (1/T) sum_i b_i.

Two readings were rejected (DESIGN.md section 4): the scalar reading Delta = ||P|| makes g'_i = g_j;
the released code multiplies by min(|Delta|, 0) = 0 and changes nothing.

The T sequences are independent, so they run in lockstep: at position r every task i looks at its own
r-th partner, and all clips of that round are one vectorised update. A clip costs O(T) (one row of M),
so the method is O(T^3) in the worst case: T = 1000 with ~40% conflicting pairs (~4e5 clips) takes
about a second. The orders are a pure function of (seed, step): identical on every rank and
restorable from a checkpoint. A call reads `step` and never changes it; the caller advances it once
per adopted step (`Balancer.advance`, called by `solve.solve_on_host`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer
from dist_mtl.balancers.seeded import SeededSteps

_FOLD_BELOW = 1e-100  # fold s_i into v_i before 1 / s_i can overflow


def task_orders(num_tasks: int, seed: int, step: int) -> np.ndarray:
    """(T, T-1) array whose row i is a random order of the tasks other than i, fixed by (seed, step)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    base = np.arange(num_tasks - 1)[None, :]
    others = base + (base >= np.arange(num_tasks)[:, None])
    return rng.permuted(others, axis=1)


def clip_coefficients(M: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Rows b_i with g'_i = G b_i after all clips, the number of clips (tau > 0) and of conflicts seen.

    A clip is b_i <- (1 - tau) b_i + tau e_j. Keeping b_i = s_i v_i with a scalar s_i turns it into
    s_i <- (1 - tau) s_i and one entry v_ij += tau / s_i, so only M v_i (for the inner products) costs
    a row of M per clip. Rows whose s_i gets tiny are folded back (v_i <- s_i v_i, s_i <- 1).
    """
    T = M.shape[0]
    tasks = np.arange(T)
    diag = np.diag(M)
    scale = np.ones(T)
    V = np.eye(T)
    MV = M.copy()  # row i: M v_i, so <g'_i, g_j> = s_i (M v_i)_j
    sq = diag.copy()  # ||g'_i||^2
    clips = conflicts = 0
    for partner in orders.T:
        inner = scale * MV[tasks, partner]
        hit = np.flatnonzero(inner < 0.0)
        if not len(hit):
            continue
        j, ip, own = partner[hit], inner[hit], sq[hit]
        # ||P||^2 = ||g'_i||^2 - 2 <g'_i, g_j> + ||g_j||^2 > 0 because <g'_i, g_j> < 0.
        tau = np.abs(own - diag[j]) / (own - 2.0 * ip + diag[j])
        scale[hit] *= 1.0 - tau
        step = tau / scale[hit]
        V[hit, j] += step
        MV[hit] += step[:, None] * M[j]
        # Clipped at 0 so that a float32 Gramian that is not quite PSD keeps ||P||^2 > 0 above.
        sq[hit] = np.maximum((1.0 - tau) ** 2 * own + 2.0 * tau * (1.0 - tau) * ip + tau**2 * diag[j], 0.0)
        conflicts += len(hit)
        clips += int(np.count_nonzero(tau > 0.0))
        small = hit[scale[hit] < _FOLD_BELOW]
        if len(small):
            V[small] *= scale[small, None]
            MV[small] *= scale[small, None]
            scale[small] = 1.0
    return scale[:, None] * V, clips, conflicts


@dataclass
class MAMG(SeededSteps, Balancer):
    """Mean of the clipped gradients with the orders for (seed, step); `advance` moves to the next step."""

    name = "mamg"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        B, clips, conflicts = clip_coefficients(M, task_orders(M.shape[0], self.seed, self.step))
        return B.mean(axis=0), {"mamg_clips": float(clips), "mamg_conflicts": float(conflicts)}
