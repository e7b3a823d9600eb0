"""MGDA: each normalisation against an explicit computation on the gradient vectors themselves."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from dist_mtl.balancers import MGDA, build_balancer


def gradients(seed: int, T: int = 5, P: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((P, 1)) + rng.standard_normal((P, T)) * rng.uniform(0.2, 3.0, size=T)
    G[:, 0] *= -1.0
    return G, rng.uniform(0.1, 3.0, size=T)


def explicit_min_norm_point(V: np.ndarray) -> np.ndarray:
    """Min-norm point of the convex hull of the columns of V, by SLSQP on the vectors."""
    T = V.shape[1]
    res = minimize(
        lambda a: float(np.sum((V @ a) ** 2)),
        np.full(T, 1.0 / T),
        jac=lambda a: 2.0 * V.T @ (V @ a),
        bounds=[(0.0, 1.0)] * T,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return V @ res.x


def explicit_normalizers(G: np.ndarray, losses: np.ndarray, kind: str) -> np.ndarray:
    norms = np.linalg.norm(G, axis=0)
    return {"none": np.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}[kind]


@pytest.mark.parametrize("kind", ["none", "l2", "loss", "loss+"])
def test_adopted_direction_is_min_norm_point_of_normalised_gradients(kind: str) -> None:
    for seed in range(3):
        G, losses = gradients(seed)
        out = build_balancer("mgda", normalization=kind)(torch.tensor(G.T @ G), torch.tensor(losses))
        d = G @ out.coefficients.numpy()
        V = G / explicit_normalizers(G, losses, kind)
        expected = explicit_min_norm_point(V)
        np.testing.assert_allclose(d, expected, atol=1e-6 * np.linalg.norm(V, axis=0).max())
        # Min-norm property: <v_t, d> >= ||d||^2 for every normalised gradient (equality on the support).
        assert (V.T @ d).min() >= d @ d - 1e-9 * np.max(np.sum(V**2, axis=0))


@pytest.mark.parametrize("kind", ["l2", "loss", "loss+"])
def test_official_apply_scales_raw_gradients_by_the_weights(kind: str) -> None:
    G, losses = gradients(4)
    M, L = torch.tensor(G.T @ G), torch.tensor(losses)
    adopted = build_balancer("mgda", normalization=kind)(M, L).coefficients.numpy()
    official = build_balancer("mgda", normalization=kind, apply="official")(M, L).coefficients.numpy()
    n = explicit_normalizers(G, losses, kind)
    np.testing.assert_allclose(official, adopted * n, rtol=1e-12)
    np.testing.assert_allclose(official.sum(), 1.0, rtol=1e-12)
    assert not np.allclose(G @ official, G @ adopted)


def test_without_normalisation_official_equals_adopted() -> None:
    G, _ = gradients(5)
    M = G.T @ G
    a = build_balancer("mgda")(M).coefficients
    b = build_balancer("mgda", apply="official")(M).coefficients
    assert torch.equal(a, b)


def test_needs_losses_only_for_loss_normalisations() -> None:
    assert [MGDA(normalization=k).needs_losses for k in ("none", "l2", "loss", "loss+")] == [
        False,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="losses must be a"):
        MGDA(normalization="loss")(np.eye(3), None)
    with pytest.raises(ValueError, match="losses must have 3 entries"):
        MGDA(normalization="loss")(np.eye(3), torch.ones(2))


def test_zero_normalisers_are_guarded_and_counted() -> None:
    G, losses = gradients(6)
    G[:, 2] = 0.0  # a task with a zero gradient
    losses[3] = 0.0  # a task with a zero loss
    M = torch.tensor(G.T @ G)
    # The zero-gradient task is left out of the solve (Balancer.__call__), so only the zero loss of
    # task 3 is clamped (twice counted by loss+, whose normaliser is loss times norm).
    for kind, clamped in (("l2", 0), ("loss", 1), ("loss+", 1)):
        out = MGDA(normalization=kind)(M, torch.tensor(losses))
        assert torch.isfinite(out.coefficients).all()
        assert out.info["degenerate_zero_norm"] == clamped
        assert out.coefficients[2] == 0.0 and out.info["degenerate_zero_gradient_tasks"] == 1.0
    # Two opposite gradients put the zero vector in the hull: a Pareto-stationary step.
    opposite = np.stack([G[:, 0], -G[:, 0]], axis=1)
    out = MGDA()(torch.tensor(opposite.T @ opposite))
    assert out.info["degenerate_pareto_stationary"] == 1.0
    np.testing.assert_allclose(opposite @ out.coefficients.numpy(), 0.0, atol=1e-12)


def test_solver_diagnostics_are_reported() -> None:
    G, _ = gradients(7, T=12, P=30)
    info = MGDA()(G.T @ G).info
    assert info["solver_converged"] == 1.0 and info["solver_gap"] <= 1e-8 and info["solver_iterations"] >= 1
