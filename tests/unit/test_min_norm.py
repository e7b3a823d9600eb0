"""The min-norm solver: optimality (KKT), agreement with an independent QP solve, degenerate Gramians."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from dist_mtl.balancers import MinNormInfo, min_norm
from dist_mtl.balancers.solver import solve_simplex_qp


def random_gradients(seed: int, T: int, P: int | None = None) -> np.ndarray:
    """P x T gradients with a shared component, spread-out norms and some sign flips (conflicts)."""
    rng = np.random.default_rng(seed)
    P = P or 2 * T + 5
    G = rng.standard_normal((P, 1)) + rng.standard_normal((P, T)) * rng.uniform(0.3, 2.0, size=T)
    return G * np.where(rng.random(T) < 0.3, -1.0, 1.0)


def objective(G: np.ndarray, a: np.ndarray) -> float:
    return float(np.sum((G @ a) ** 2))


def assert_simplex(a: torch.Tensor) -> None:
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    assert torch.isfinite(a).all()
    assert a.min() >= 0.0
    assert abs(float(a.sum()) - 1.0) < 1e-12


def slsqp_min_norm(G: np.ndarray) -> np.ndarray:
    """An independent solve on the explicit vectors (no Gramian), for cross-checking."""
    T = G.shape[1]
    best = None
    for start in (np.full(T, 1.0 / T), np.eye(T)[int(np.argmin(np.sum(G**2, axis=0)))]):
        res = minimize(
            lambda a: objective(G, a),
            start,
            jac=lambda a: 2.0 * G.T @ (G @ a),
            bounds=[(0.0, 1.0)] * T,
            constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(T)}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 2000},
        )
        x = np.clip(res.x, 0.0, None) / np.clip(res.x, 0.0, None).sum()
        if best is None or objective(G, x) < objective(G, best):
            best = x
    return best


@pytest.mark.parametrize("T", [1, 2, 3, 10, 40, 200])
def test_kkt_conditions_on_random_gramians(T: int) -> None:
    for seed in range(3):
        G = random_gradients(seed, T)
        M = G.T @ G
        a, info = min_norm(torch.tensor(M))
        assert_simplex(a)
        assert info.converged and info.gap <= 1e-8
        x = a.numpy()
        grad, value = M @ x, float(x @ M @ x)
        scale = np.max(np.diag(M))
        # (M a)_i >= a^T M a everywhere and = on the support: the simplex KKT conditions.
        assert grad.min() >= value - 1e-9 * scale
        support = x > 1e-12
        np.testing.assert_allclose(grad[support], value, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("T", [3, 6, 10, 25])
def test_agrees_with_independent_qp_solve(T: int) -> None:
    for seed in range(4):
        G = random_gradients(100 + seed, T)
        a, _ = min_norm(G.T @ G)
        ours, ref = objective(G, a.numpy()), objective(G, slsqp_min_norm(G))
        assert ours <= ref * (1 + 1e-7)
        assert ref <= ours * (1 + 1e-6)  # SLSQP itself is only this accurate


def test_two_tasks_closed_form() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        g1, g2 = rng.standard_normal(5), rng.standard_normal(5)
        gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
        a, info = min_norm(np.array([[g1 @ g1, g1 @ g2], [g1 @ g2, g2 @ g2]]))
        np.testing.assert_allclose(a.numpy(), [gamma, 1 - gamma], atol=1e-14)
        assert info.iterations == 1 and info.converged
    # g2 = 2 g1: no conflict, the shorter gradient alone is the min-norm point.
    a, _ = min_norm(np.array([[1.0, 2.0], [2.0, 4.0]]))
    np.testing.assert_array_equal(a.numpy(), [1.0, 0.0])


def test_degenerate_gramians_give_simplex_points() -> None:
    rng = np.random.default_rng(3)
    g = rng.standard_normal((6, 4))
    cases = {
        "zero": np.zeros((5, 5)),
        "duplicates": np.hstack([g, g]).T @ np.hstack([g, g]),
        "rank_one_mixed_signs": np.outer([1.0, -2.0, 0.5, 3.0], [1.0, -2.0, 0.5, 3.0]),
        "rank_one_same_sign": np.outer([1.0, 2.0, 0.5], [1.0, 2.0, 0.5]),
        "one_zero_gradient": np.pad(g.T @ g, ((0, 1), (0, 1))),
        "single": np.array([[4.0]]),
        "two_identical": np.ones((2, 2)),
    }
    for name, M in cases.items():
        a, info = min_norm(M)
        assert_simplex(a)
        assert isinstance(info, MinNormInfo) and info.converged, name
    assert min_norm(cases["zero"])[1].degenerate == "zero_gramian"
    assert min_norm(cases["single"])[1].degenerate == "single_task"
    assert min_norm(cases["two_identical"])[1].degenerate == "identical_tasks"
    # A conflicting rank-one set and a zero gradient both reach the zero vector.
    for name in ("rank_one_mixed_signs", "one_zero_gradient"):
        a, info = min_norm(cases[name])
        assert float(a @ torch.tensor(cases[name]) @ a) <= 1e-12 * np.max(np.diag(cases[name]))
        assert info.degenerate == "pareto_stationary"
    # Same-sign rank one: the shortest gradient; duplicates: the optimum of the distinct gradients.
    np.testing.assert_allclose(min_norm(cases["rank_one_same_sign"])[0].numpy(), [0.0, 0.0, 1.0])
    a_dup, _ = min_norm(cases["duplicates"])
    a_distinct, _ = min_norm(g.T @ g)
    np.testing.assert_allclose(a_dup[:4] + a_dup[4:], a_distinct, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e12])
def test_weights_invariant_to_scaling(scale: float) -> None:
    G = random_gradients(11, 30)
    M = G.T @ G
    a, _ = min_norm(M)
    a_scaled, info = min_norm(M * scale)
    assert info.converged
    np.testing.assert_allclose(a_scaled.numpy(), a.numpy(), atol=1e-10)


def test_weights_equivariant_to_permutations() -> None:
    G = random_gradients(12, 40)
    M = G.T @ G
    a, _ = min_norm(M)
    perm = np.random.default_rng(0).permutation(40)
    a_perm, _ = min_norm(M[np.ix_(perm, perm)])
    np.testing.assert_allclose(a_perm.numpy(), a.numpy()[perm], atol=1e-10)


def test_linear_term_form_equals_min_norm_of_translated_points() -> None:
    """1/2 x^T G^T G x + (G^T v)^T x on the simplex is ||G x + v||^2 / 2 up to a constant (GetMTL's QP)."""
    for seed in range(3):
        G = random_gradients(20 + seed, 12)
        v = np.random.default_rng(seed).standard_normal(G.shape[0])
        H = G + v[:, None]
        x, info = solve_simplex_qp(G.T @ G, G.T @ v, 1e-12, 1000)
        assert info.converged
        expected, _ = min_norm(H.T @ H)
        np.testing.assert_allclose(objective(H, x), objective(H, expected.numpy()), rtol=1e-9)
        # Warm starts, including a seed set with duplicates and more points than the support, agree.
        for init in (np.flatnonzero(x), list(range(12)) + [0, 0]):
            warm, _ = solve_simplex_qp(G.T @ G, G.T @ v, 1e-12, 1000, init)
            np.testing.assert_allclose(objective(H, warm), objective(H, x), rtol=1e-9)


def test_iteration_cap_really_caps() -> None:
    G = random_gradients(13, 40)
    M = G.T @ G
    _, full = min_norm(M)
    assert full.iterations > 3
    for cap in (1, 3):
        a, info = min_norm(M, max_iter=cap)
        assert info.iterations == cap and not info.converged and info.gap > 1e-8
        assert_simplex(a)


def test_accepts_torch_float32_and_numpy_alike() -> None:
    G = random_gradients(14, 8)
    M = G.T @ G
    a64, _ = min_norm(M)
    a32, _ = min_norm(torch.tensor(M, dtype=torch.float32))
    assert_simplex(a32)
    np.testing.assert_allclose(a32.numpy(), a64.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("M", "kwargs", "match"),
    [
        (np.ones((2, 3)), {}, "M must be a non-empty square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, "M must be finite"),
        (np.eye(3), {"tol": -1.0}, "tol must be a finite number >= 0"),
        (np.eye(3), {"max_iter": 0}, "max_iter must be an integer >= 1"),
    ],
)
def test_bad_input_is_named(M: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        min_norm(M, **kwargs)


@pytest.mark.parametrize(("T", "rank"), [(40, 20), (40, 28), (65, 30), (300, 60), (300, 700)])
def test_rank_deficient_and_large_gramians_meet_kkt(T: int, rank: int) -> None:
    """Batches of vertices that are affinely dependent (rank < T) and large supports (T = 300, where
    leaving points are kept as constraints instead of being re-factored away) still end at the KKT point."""
    for seed in range(3):
        rng = np.random.default_rng(300 + seed)
        G = rng.standard_normal((rank, 1)) + rng.standard_normal((rank, T)) * rng.uniform(0.1, 3.0, size=T)
        G *= np.where(rng.random(T) < 0.3, -1.0, 1.0)
        M = G.T @ G
        a, info = min_norm(M)
        assert_simplex(a)
        assert info.converged
        assert info.gap <= 1e-8 or info.degenerate == "pareto_stationary"
        x = a.numpy()
        grad, value = M @ x, float(x @ M @ x)
        scale = np.max(np.diag(M))
        assert grad.min() >= value - 1e-9 * scale
        np.testing.assert_allclose(grad[x > 1e-12], value, rtol=0, atol=1e-9 * scale)
