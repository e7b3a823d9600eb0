"""The min-norm solver's moves beyond the textbook: batched insertion and drops at once.

Wolfe's algorithm (`solver.py`) admits one vertex per major cycle and leaves the corral one point per
line search. Both are fine for T = 40 and far too slow for T = 1000 with ~800 tasks in the support.
Every move here keeps its termination argument: each accepted corral is an affine minimiser with
positive weights and a strictly smaller objective than the last, so none repeats.

- `enter` admits up to max(MIN_BATCH, corral size) improving vertices at once, most negative gradient
  first: ~40 affine solves instead of ~900 on T = 1000.
- `drop_at_once`: when the affine minimiser has non-positive weights, drop all of them and re-solve (a
  few rounds), kept only if that ends on positive weights and a better value; else Wolfe's line search.
"""

from __future__ import annotations

import numpy as np

from dist_mtl.balancers.corral import Corral

MIN_BATCH = 64  # vertices a major cycle may admit even when the corral is smaller
DROP_ROUNDS = 8  # affine solves a minor cycle may spend dropping all non-positive weights at once


def enter(corral: Corral, cand: np.ndarray, grad: np.ndarray) -> bool:
    """Bring improving vertices (`cand`, most negative gradient first) into the corral with weight 0;
    False if none can enter."""
    batch = cand[: max(len(corral.S) - len(corral.D), MIN_BATCH)]
    return corral.admit(batch)


def drop_at_once(
    corral: Corral, alpha: np.ndarray, out: np.ndarray, budget: int, f_prev: float
) -> tuple[bool, int]:
    """Drop every non-positive weight of the affine minimiser `alpha` at once and re-solve, up to
    DROP_ROUNDS times within `budget` affine solves. Returns (accepted, affine solves used); when not
    accepted (no positive minimiser, or not below `f_prev`) the corral is restored unchanged."""
    saved, trial, value, used = corral.state(), None, np.inf, 0
    for _ in range(min(DROP_ROUNDS, budget)):
        if not corral.drop(out, alpha):
            break
        used += 1
        trial, value = corral.affine()
        out = corral.nonpositive(trial)
        if out is None or not len(out):
            break
    if out is None and value < f_prev:
        corral.lam = trial
        return True, used
    corral.restore(saved)
    return False, used
