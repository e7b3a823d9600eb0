"""GetMTL: the closed form against a brute-force maximin on explicit vectors, eps -> 0, edge cases.

The maximin (seed 000, Problem 2 with the constraint read off its Lagrangian, Eq. 19-22):
    max_d min_i <beta_i g_i, d>   s.t.   ||d - g0||^2 <= eps ||g0|| ||d||^2,
with beta the MGDA weights and g0 the mean gradient. It is solved here directly over d in R^P with
SLSQP, without the Gramian, the closed form or the step-3 reformulation.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from dist_mtl.balancers import GetMTL, build_balancer
from dist_mtl.balancers.getmtl import DEFAULT_MAX_SCALE, STEP3_TOL, solve_trade_off
from dist_mtl.balancers.solver import solve_min_norm


def explicit_mgda_weights(G: np.ndarray) -> np.ndarray:
    T = G.shape[1]
    res = minimize(
        lambda a: float(np.sum((G @ a) ** 2)),
        np.full(T, 1.0 / T),
        jac=lambda a: 2.0 * G.T @ (G @ a),
        bounds=[(0.0, 1.0)] * T,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return res.x


def brute_force_maximin(G: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    P, T = G.shape
    g0 = G.mean(axis=1)
    radius = eps * np.linalg.norm(g0)
    Gt = G * beta
    constraints = [
        {"type": "ineq", "fun": lambda x: Gt.T @ x[:P] - x[P], "jac": lambda x: np.c_[Gt.T, -np.ones(T)]},
        {
            "type": "ineq",
            "fun": lambda x: radius * x[:P] @ x[:P] - np.sum((x[:P] - g0) ** 2),
            "jac": lambda x: np.r_[2 * radius * x[:P] - 2 * (x[:P] - g0), 0.0],
        },
    ]
    best = None
    for start in (g0, 1.2 * g0, g0 + Gt.sum(axis=1)):
        res = minimize(
            lambda x: -x[P],
            np.r_[start, 0.0],
            jac=lambda x: np.r_[np.zeros(P), -1.0],
            constraints=constraints,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x[:P]


def small_problems(count: int) -> list[tuple[np.ndarray, float]]:
    """Random T <= 4, P <= 6 problems whose MGDA weights are interior (so the maximiser is unique)."""
    rng = np.random.default_rng(1)
    out = []
    while len(out) < count:
        T = int(rng.integers(2, 5))
        G = 0.5 * rng.standard_normal((int(rng.integers(T, 7)), T))
        eps = float(rng.uniform(0.05, 1.0))
        if explicit_mgda_weights(G).min() > 1e-3 and eps * np.linalg.norm(G.mean(axis=1)) < 0.9:
            out.append((G, eps))
    return out


def test_closed_form_matches_brute_force_maximin() -> None:
    for G, eps in small_problems(8):
        d_ref = brute_force_maximin(G, explicit_mgda_weights(G), eps)
        out = build_balancer("getmtl", eps=eps)(torch.tensor(G.T @ G))
        d = G @ out.coefficients.numpy()
        np.testing.assert_allclose(d, d_ref, atol=1e-4 * np.linalg.norm(d_ref))
        assert out.info["degenerate_zero_gw"] == 0.0 and out.info["degenerate_no_scale"] == 0.0


def objective_j(w: np.ndarray, Mt: np.ndarray, a: np.ndarray, k: float) -> float:
    """J's numerator a^T w + k ||G~ w|| (the positive denominator does not move the argmin)."""
    return float(a @ w + k * math.sqrt(w @ Mt @ w))


def test_step_three_is_solved_to_the_stated_tolerance() -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        Gt = rng.standard_normal((8, 6))
        g0 = rng.standard_normal(8)
        Mt, a, k = Gt.T @ Gt, Gt.T @ g0, float(rng.uniform(0.1, 2.0))
        trade = solve_trade_off(Mt, a, k, 1e-10, 1000)
        assert trade.w is not None and trade.gap <= STEP3_TOL
        best = objective_j(trade.w, Mt, a, k)
        others = np.vstack([rng.dirichlet(np.ones(6), size=2000), np.eye(6)])
        assert best <= min(objective_j(w, Mt, a, k) for w in others) + 1e-12


def test_eps_to_zero_gives_the_average_gradient() -> None:
    G = np.random.default_rng(3).standard_normal((10, 4))
    c = GetMTL(eps=1e-12)(G.T @ G).coefficients.numpy()
    np.testing.assert_allclose(c, 0.25, rtol=1e-5)


def test_zero_gw_edge_case_uses_the_scaled_mean_gradient() -> None:
    # g1 is shorter than g2 and <g1, g2> >= ||g1||^2, so beta = (1, 0): the optimal w sits on task 2.
    G = np.array([[1.0, 2.0], [0.0, 0.1]])
    eps = 0.2
    out = GetMTL(eps=eps)(G.T @ G)
    assert out.info["degenerate_zero_gw"] == 1.0
    scale = 1.0 - eps * np.linalg.norm(G.mean(axis=1))
    np.testing.assert_allclose(out.coefficients.numpy(), 0.5 / scale, rtol=1e-12)


def test_no_scale_edge_case_never_flips_the_direction() -> None:
    G, eps = small_problems(1)[0]
    G = G * 3.0 / (eps * np.linalg.norm(G.mean(axis=1)))  # eps ||g0|| = 3: 1 - eps ||g0|| < 0
    T = G.shape[1]
    out = GetMTL(eps=eps)(G.T @ G)
    c = out.coefficients.numpy()
    assert out.info["degenerate_no_scale"] == 1.0 and out.info["degenerate_zero_gw"] == 0.0
    assert out.info["getmtl_capped"] == 1.0 and out.info["getmtl_factor"] == DEFAULT_MAX_SCALE
    # The (negative) factor is replaced by the cap: every coefficient is max_scale (1/T + a term >= 0).
    assert c.min() >= DEFAULT_MAX_SCALE / T - 1e-15 and c.max() > DEFAULT_MAX_SCALE / T
    assert (G @ c) @ G.mean(axis=1) > 0.0


def unscaled_direction(G: np.ndarray, eps: float) -> np.ndarray:
    """g0 + (k / ||g~_w||) g~_w on the explicit vectors: GetMTL's d without 1 / (1 - eps ||g0||)."""
    beta, _ = solve_min_norm(G.T @ G)
    g0, Gt = G.mean(axis=1), G * beta
    k = math.sqrt(eps) * np.linalg.norm(g0) ** 1.5
    w = solve_trade_off(Gt.T @ Gt, Gt.T @ g0, k, 1e-12, 10_000).w
    gw = Gt @ w
    return g0 + (k / np.linalg.norm(gw)) * gw


@pytest.mark.parametrize("max_scale", [DEFAULT_MAX_SCALE, 20.0])
@pytest.mark.parametrize("eps_g0", [0.5, 0.9, 0.99, 0.999, 1.0, 1.5])
def test_scale_factor_is_capped_near_and_past_the_pole(max_scale: float, eps_g0: float) -> None:
    """Uncapped, ||d|| / ||g0|| reached 19, 198, 1986 at eps ||g0|| = 0.9, 0.99, 0.999."""
    G, eps = small_problems(1)[0]
    G = G * eps_g0 / (eps * np.linalg.norm(G.mean(axis=1)))
    g0 = G.mean(axis=1)
    d_free = unscaled_direction(G, eps)
    out = GetMTL(eps=eps, max_scale=max_scale)(G.T @ G)
    d = G @ out.coefficients.numpy()
    ratio = np.linalg.norm(d) / np.linalg.norm(g0)
    assert np.isfinite(ratio)
    assert ratio <= max_scale * np.linalg.norm(d_free) / np.linalg.norm(g0) * (1 + 1e-9)
    assert d @ d_free / (np.linalg.norm(d) * np.linalg.norm(d_free)) > 1 - 1e-9  # never flips
    uncapped = 1.0 / (1.0 - eps_g0) if eps_g0 < 1.0 else math.inf
    expected = min(uncapped, max_scale)
    np.testing.assert_allclose(d, expected * d_free, rtol=1e-7, atol=1e-7 * np.linalg.norm(d))
    if not math.isclose(uncapped, max_scale, rel_tol=1e-9):  # a tie binds either way, with the same d
        assert out.info["getmtl_capped"] == float(uncapped > max_scale)
    assert out.info["getmtl_factor"] == pytest.approx(expected, rel=1e-9)
    if eps_g0 > 1.0:
        assert out.info["degenerate_no_scale"] == 1.0


def test_max_scale_must_be_finite_and_above_one() -> None:
    for bad in (1.0, 0.5, -2.0, math.inf, math.nan, True, "10"):
        with pytest.raises(ValueError, match="balancer.max_scale must be a finite number > 1"):
            GetMTL(max_scale=bad)
    assert build_balancer("getmtl", max_scale=2).max_scale == 2


@pytest.mark.parametrize(
    "G",
    [np.zeros((3, 4)), np.array([[1.0, -1.0], [2.0, -2.0]]), np.ones((5, 1))],
    ids=["all_zero", "opposite_pair", "single_task"],
)
def test_degenerate_gramians_stay_finite(G: np.ndarray) -> None:
    c = GetMTL(eps=0.5)(G.T @ G).coefficients
    assert torch.isfinite(c).all()
    if not np.any(G.mean(axis=1)):
        np.testing.assert_allclose(c.numpy(), 1.0 / G.shape[1])  # g0 = 0: k = 0, d = g0


def test_eps_must_be_in_unit_interval() -> None:
    for eps in (0.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"balancer.eps must be in \(0, 1\]"):
            GetMTL(eps=eps)
