"""The min-norm solver against an independent solve: scipy's NNLS on the explicit gradients.

min over the simplex of ||G x||^2 is exactly an NNLS problem: for y >= 0 write y = s x with s = 1^T y;
||G y||^2 + (1^T y - 1)^2 = s^2 ||G x||^2 + (s - 1)^2 is smallest at s = 1 / (1 + ||G x||^2), where it
equals ||G x||^2 / (1 + ||G x||^2), increasing in ||G x||^2. So x* = y* / 1^T y* with
y* = argmin_{y >= 0} ||[G; 1^T] y - [0; 1]||. NNLS works on G (QR, no Gramian, no corral), so it is an
independent oracle, and it stays accurate where M = G^T G is singular to working precision.
"""

import numpy as np
import pytest
from scipy.optimize import nnls

from dist_mtl.balancers.solver import DEFAULT_TOL, solve_min_norm

RTOL = 1e-9  # objective agreement; the solver's certificate (gap <= 1e-10) bounds its excess by 2e-10


def nnls_min_norm(G: np.ndarray) -> np.ndarray:
    P, T = G.shape
    unit = np.sqrt(np.max(np.sum(G**2, axis=0)))  # rescale G: the reformulation is exact for any scale
    E = np.vstack([G / unit, np.ones((1, T))])
    y, _ = nnls(E, np.r_[np.zeros(P), 1.0], maxiter=50 * T)
    return y / y.sum()


def near_duplicates(seed: int, P: int, pairs: int = 150, delta: float = 1e-7) -> np.ndarray:
    """P x 2 pairs gradients: random columns and copies of them perturbed by delta (the issue's case)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((P, pairs))
    return np.hstack([G, G + delta * rng.standard_normal(G.shape)])


def assert_matches_oracle(G: np.ndarray, warm: np.ndarray | None = None) -> None:
    M = G.T @ G
    a, info = solve_min_norm(M, warm=warm)
    ref = nnls_min_norm(G)
    ours, best = float(a @ M @ a), float(ref @ M @ ref)
    scale = float(np.max(np.diag(M)))
    assert info.converged, info
    assert a.min() >= 0.0 and abs(a.sum() - 1.0) < 1e-12
    if best <= 1e-13 * scale:  # Pareto stationary: the minimum norm is zero to working precision
        assert ours <= 1e-13 * scale and info.degenerate == "pareto_stationary"
        return
    assert info.gap <= DEFAULT_TOL
    assert abs(ours - best) <= RTOL * best, (ours / best - 1.0, info)
    # KKT on the simplex: (M a)_i >= a^T M a everywhere, with equality on the support.
    grad = M @ a
    assert grad.min() >= ours - 1e-9 * ours
    np.testing.assert_allclose(grad[a > 0], ours, rtol=1e-9)


@pytest.mark.parametrize(("P", "seed"), [(100, 0), (100, 1), (100, 2), (200, 0), (500, 0), (500, 1)])
def test_near_duplicate_pairs_at_t300_converge_to_the_nnls_optimum(P: int, seed: int) -> None:
    """T = 300, 150 pairs 1e-7 apart. Before the pairwise exchange, Wolfe refused the second twin of each
    pair (the corral with both is singular to working precision) and stopped unconverged."""
    assert_matches_oracle(near_duplicates(seed, P))


@pytest.mark.parametrize("delta", [1e-5, 1e-7, 1e-9, 0.0])
def test_near_duplicates_of_every_size(delta: float) -> None:
    for seed, P in ((3, 30), (4, 80)):
        assert_matches_oracle(near_duplicates(seed, P, pairs=40, delta=delta))


@pytest.mark.parametrize("T", [3, 10, 40, 150])
def test_random_gramians(T: int) -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        G = rng.standard_normal((2 * T + 5, 1)) + rng.standard_normal((2 * T + 5, T)) * rng.uniform(0.3, 2, T)
        assert_matches_oracle(G * np.where(rng.random(T) < 0.3, -1.0, 1.0))


def hard_gradients(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "rank_deficient":  # 120 tasks in 30 dimensions, one shared direction
        return rng.standard_normal((30, 1)) + rng.standard_normal((30, 120)) * rng.uniform(0.1, 3.0, 120)
    if kind == "spread_norms":  # norms over eight orders of magnitude
        return rng.standard_normal((60, 50)) * 10.0 ** rng.uniform(-4, 4, 50)
    if kind == "low_rank_conflicts":  # bench/solvers.py's Gramians: ~80% of the tasks in the support
        T, P = 200, 464
        U = rng.standard_normal((P, 8)) / np.sqrt(P)
        G = 2.0 * U[:, :1] + U @ rng.standard_normal((8, T)) + 0.5 * rng.standard_normal((P, T)) / np.sqrt(P)
        return G * np.where(rng.random(T) < 0.3, -1.0, 1.0)
    if kind == "triplets":  # three near-copies of each of 40 gradients
        G = rng.standard_normal((70, 40))
        return np.hstack([G + 1e-7 * rng.standard_normal(G.shape) for _ in range(3)])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["rank_deficient", "spread_norms", "low_rank_conflicts", "triplets"])
def test_hard_gramians(kind: str) -> None:
    for seed in range(2):
        assert_matches_oracle(hard_gradients(kind, seed))


@pytest.mark.parametrize("kind", ["rank_deficient", "spread_norms", "low_rank_conflicts", "triplets"])
def test_hard_gramians_warm_started(kind: str) -> None:
    """Warm starts (MGDA's previous step) from a nearby problem's answer and from an unrelated one reach
    the same optimum: the start changes the path, never the certificate."""
    for seed in range(2):
        G = hard_gradients(kind, seed)
        rng = np.random.default_rng(seed)
        nearby = G + 1e-3 * np.linalg.norm(G, axis=0) / np.sqrt(G.shape[0]) * rng.standard_normal(G.shape)
        other = hard_gradients(kind, seed + 10)
        for start in (nearby, other):
            assert_matches_oracle(G, warm=solve_min_norm(start.T @ start)[0])
