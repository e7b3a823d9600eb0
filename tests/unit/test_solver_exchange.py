"""The pairwise exchange that finishes near-duplicate tasks, on problems small enough to read."""

import numpy as np

from dist_mtl.balancers.corral import Corral
from dist_mtl.balancers.solver import solve_min_norm, solve_simplex_qp


def twins(seed: int, P: int = 6, pairs: int = 3, delta: float = 1e-7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((P, pairs))
    return np.hstack([G, G + delta * rng.standard_normal(G.shape)])


def test_six_tasks_in_three_twin_pairs_converge() -> None:
    """Even T = 6 stalled before: the corral refused the second twin, whichever was the better one."""
    for seed in range(10):
        G = twins(seed)
        M = G.T @ G
        a, info = solve_min_norm(M)
        assert info.converged and info.gap <= 1e-10, (seed, info)
        pair = a[:3] + a[3:]
        distinct, _ = solve_min_norm(G[:, :3].T @ G[:, :3])
        np.testing.assert_allclose(pair, distinct, atol=1e-6)
        # Along e_j' - e_j the objective is linear up to ||delta||^2: the weight sits on one twin.
        assert np.all(np.minimum(a[:3], a[3:]) == 0.0)


def test_translated_points_form_converges_with_twins() -> None:
    """GetMTL's QP form (a linear term) takes the same finish."""
    for seed in range(5):
        G = twins(seed, P=40, pairs=20)
        v = np.random.default_rng(seed).standard_normal(40)
        x, info = solve_simplex_qp(G.T @ G, G.T @ v, 1e-10, 10_000)
        assert info.converged and info.gap <= 1e-10, (seed, info)


def test_dependent_flags_exactly_the_twins_of_corral_points() -> None:
    G = twins(0, P=10, pairs=4)
    M = G.T @ G
    scale = float(np.max(np.diag(M)))
    corral = Corral(M, scale, None, 0)
    assert corral.extend(np.array([1, 2])) == 2
    dependent = corral.dependent(np.array([3, 4, 5, 6, 7]))
    # Tasks 4, 5, 6 copy corral points 0, 1, 2; task 3 and its copy 7 are new directions.
    np.testing.assert_array_equal(dependent, [False, True, True, True, False])
