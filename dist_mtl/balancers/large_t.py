"""The min-norm solver's moves beyond the textbook: batched insertion, drops at once, pairwise exchange.

Wolfe's algorithm (`solver.py`) admits one vertex per major cycle and leaves the corral one point per
line search. Both are fine for T = 40 and far too slow for T = 1000 with ~800 tasks in the support,
and the textbook has no answer when an improving vertex cannot enter at all. Every move here keeps its
termination argument: each accepted corral is an affine minimiser with positive weights and a strictly
smaller objective than the last, so none repeats.

- `enter` admits up to max(MIN_BATCH, corral size) improving vertices at once, most negative gradient
  first: ~40 affine solves instead of ~900 on T = 1000.
- `drop_at_once`: when the affine minimiser has non-positive weights, drop all of them and re-solve (a
  few rounds), kept only if that ends on positive weights and a better value; else Wolfe's line search.
- `exchange`, the finishing move for near-duplicate tasks (see its docstring).
"""

from __future__ import annotations

import numpy as np

from dist_mtl.balancers.corral import Corral

MIN_BATCH = 64  # vertices a major cycle may admit even when the corral is smaller
DROP_ROUNDS = 8  # affine solves a minor cycle may spend dropping all non-positive weights at once


def enter(corral: Corral, cand: np.ndarray, grad: np.ndarray) -> bool:
    """Bring improving vertices (`cand`, most negative gradient first) into the corral with weight 0, or
    exchange them for corral points when none can enter; False if neither is possible."""
    batch = cand[: max(len(corral.S) - len(corral.D), MIN_BATCH)]
    return corral.admit(batch) or exchange(corral, batch, grad)


def drop_at_once(
    corral: Corral, alpha: np.ndarray, out: np.ndarray, budget: int, f_prev: float
) -> tuple[bool, int]:
    """Drop every non-positive weight of the affine minimiser `alpha` at once and re-solve, up to
    DROP_ROUNDS times within `budget` affine solves. Returns (accepted, affine solves used); when not
    accepted (no positive minimiser, or not below `f_prev`) the corral is restored unchanged."""
    saved, trial, value, priority, used = corral.state(), None, np.inf, alpha, 0
    for _ in range(min(DROP_ROUNDS, budget)):
        if not corral.drop(out, priority):
            break
        used += 1
        trial, value = corral.affine()
        out, priority = corral.nonpositive(trial), trial
        if out is None or not len(out):
            break
    if out is None and value < f_prev:
        corral.lam = trial
        return True, used
    corral.restore(saved)
    return False, used


def exchange(corral: Corral, cand: np.ndarray, grad: np.ndarray) -> bool:
    """Pairwise Frank-Wolfe steps that move all of a corral point's weight onto an improving vertex that
    cannot enter because it is an affine combination of the corral to working precision.

    Why this finish: with near-duplicate tasks (g_j' = g_j + delta, ||delta|| ~ 1e-7 ||g_j||) the
    corral holding both twins is singular to working precision, so Wolfe refuses the twin and stalls,
    typically with the right pairs but the wrong twin of some (gap 1e-8 to 1 on T = 300). The optimum
    generically holds one twin of each pair: along e_j' - e_j the objective is gamma <g_j' - g_j, p> +
    O(||delta||^2), so all of the pair's weight goes to one end. The move that reaches it without
    ever factoring a singular corral is an exchange: the pairwise step from corral point v to vertex
    s, with exact line search ending at the bound (all of lam_v moves), which replaces v by s in the
    corral. Away steps would need the singular corral; an NNLS polish would need a rank-revealing
    factor of M. The exchange keeps every corral affinely independent, costs one factor update, and
    the next minor cycle re-solves the new corral exactly, so convergence stays finite.

    Each dependent vertex s gets the partner v that lowers f = 1/2 x^T Q x + q^T x most,
    lam_v (grad_s - grad_v) + lam_v^2 ||g_s - g_v||^2 / 2 (scaled), if that is negative; all
    exchanges with distinct partners are applied together if they lower f, else only the best one.
    Returns False (the same point) when no exchange lowers f.
    """
    saved = corral.state()
    dep = corral.dependent(cand)  # may re-factor B \ D first: the same point, a new representation
    if not dep.any():
        return False
    S, lam, Q, scale = corral.S, corral.lam, corral.Q, corral.scale
    s = cand[dep]
    diag = Q.diagonal() / scale
    kappa = diag[s, None] + diag[None, S] - 2.0 / scale * Q[np.ix_(s, S)]  # ||g_s - g_v||^2
    change = lam * (grad[s, None] - grad[None, S]) + 0.5 * lam**2 * kappa
    partner = change.argmin(axis=1)
    gain = change[np.arange(len(s)), partner]
    order = np.argsort(gain, kind="stable")
    order = order[gain[order] < 0.0]
    s, v = s[order], partner[order]
    _, first = np.unique(v, return_index=True)  # each corral point leaves once, for its best exchange
    first.sort()
    s, v = s[first], v[first]
    k = len(s)
    if k > 1 and not _change(corral, grad, s, S[v], lam[v]) < 0.0:
        k = 1  # the exchanges interact badly: the best one alone still lowers f
    if not k or not _change(corral, grad, s[:k], S[v[:k]], lam[v[:k]]) < 0.0:
        return False
    w = corral.weights()
    trial = w.copy()
    trial[s[:k]] += lam[v[:k]]
    trial[S[v[:k]]] = 0.0
    # The partners must leave B itself, not only become constraints: s is dependent on B while they are in.
    left = corral.drop(v[:k], lam) and (not len(corral.D) or corral.compact())
    entered = corral.extend(s[:k]) if left else 0
    corral.lam = trial[corral.S]
    if entered < k:  # an entering vertex was refused (or none could enter): its partner's weight is gone
        corral.lam /= max(corral.lam.sum(), np.finfo(np.float64).tiny)
        if not entered or not _value(corral, corral.weights()) < _value(corral, w):
            corral.restore(saved)
            return False
    return True


def _change(corral: Corral, grad: np.ndarray, s: np.ndarray, v: np.ndarray, moved: np.ndarray) -> float:
    """f(w + sum_k moved_k (e_s_k - e_v_k)) - f(w) from the gradient at w, exactly and without the
    cancellation of subtracting two values of f (the change is ~1e-12 of f for 1e-7 twins)."""
    idx = np.concatenate([s, v])
    step = np.concatenate([moved, -moved])
    curvature = float(step @ corral.Q[np.ix_(idx, idx)] @ step) / corral.scale
    return float(grad[idx] @ step) + 0.5 * curvature


def _value(corral: Corral, w: np.ndarray) -> float:
    """f(w) = 1/2 w^T Q w / scale + q^T w (q omitted when None), the objective Wolfe decreases."""
    value = 0.5 * float(w @ (corral.Q @ w)) / corral.scale
    return value + float(corral.q @ w) if corral.q is not None else value
