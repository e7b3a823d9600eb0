"""FairGrad and Nash-MTL: M w = w^(-1/alpha) against TorchJD's weightings, the residual and degenerate M."""

import warnings

import numpy as np
import pytest
import torch
from torchjd.aggregation import FairGradWeighting
from torchjd.aggregation import NashMTL as TorchJDNashMTL

from dist_mtl.balancers._power_equation import power_residual, solve_power_equation
from dist_mtl.balancers.fairgrad import FairGrad
from dist_mtl.balancers.nash_mtl import NashMTL


def gradients(kind: str, seed: int, T: int) -> np.ndarray:
    """P x T gradients for which a solution exists (no subset of tasks is Pareto stationary)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((T + 10, T)) * rng.uniform(0.5, 2.0, size=T)
    if kind == "low_rank":  # rank 3 < T, nonnegative: no subset of the tasks cancels
        return np.abs(rng.standard_normal((20, 3))) @ np.abs(rng.standard_normal((3, T)))
    if kind == "duplicated":
        G = rng.standard_normal((T + 10, T // 2 + 1))
        return np.concatenate([G, G[:, : T - G.shape[1]]], axis=1)
    # near_degenerate: pairs 1e-6 apart, norms over two orders of magnitude
    G = rng.standard_normal((T + 10, T // 2 + 1))
    G = np.concatenate([G, G[:, : T - G.shape[1]] + 1e-6 * rng.standard_normal((T + 10, T - G.shape[1]))], 1)
    return G * np.logspace(-1, 1, T)


KINDS = ["random", "low_rank", "duplicated", "near_degenerate"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_equals_torchjd(kind: str, alpha: float) -> None:
    """rtol 1e-6 where scipy's least_squares gets the residual below 1e-9; else ours is at least 100x
    smaller (least_squares stops on its own tolerances, e.g. at 1e-4 on low-rank Gramians)."""
    compared = 0
    for seed, T in ((0, 2), (1, 5), (2, 12), (3, 40)):
        G = gradients(kind, seed, T)
        M = G.T @ G
        out = FairGrad(alpha=alpha)(torch.tensor(M))
        ours = out.coefficients.numpy()
        expected = FairGradWeighting(alpha)(torch.tensor(M)).numpy()
        assert out.info["fairgrad_converged"] == 1.0 and out.info["fairgrad_unbounded"] == 0.0
        assert power_residual(M, ours, 1 / alpha) <= 1e-9
        theirs = power_residual(M, expected, 1 / alpha)
        if theirs <= 1e-9:
            np.testing.assert_allclose(ours, expected, rtol=1e-6)
            compared += 1
        else:
            assert power_residual(M, ours, 1 / alpha) <= 1e-2 * theirs
    assert compared >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_nash_mtl_equals_torchjd_without_its_norm_clip(kind: str) -> None:
    """TorchJD's CCP with max_norm = 0 (ECOS; stops when alpha moves < 1e-6): rtol 1e-4 where its
    residual is below 1e-6; else (50 CCP steps were not enough, or ECOS failed and it kept the previous
    alpha) ours is 100x smaller. Ours is always below 1e-9."""
    compared = 0
    for seed, T in ((0, 2), (1, 3), (2, 6)):
        G = gradients(kind, seed, T)
        M = G.T @ G
        out = NashMTL()(torch.tensor(M))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = (
                TorchJDNashMTL(n_tasks=T, max_norm=0.0, optim_niter=50).weighting(torch.tensor(G.T)).numpy()
            )
        ours = out.coefficients.numpy()
        assert out.info["nash_mtl_converged"] == 1.0 and power_residual(M, ours, 1.0) <= 1e-9
        theirs = power_residual(M, expected, 1.0)
        if theirs <= 1e-6:
            np.testing.assert_allclose(ours, expected, rtol=1e-4)
            compared += 1
        else:
            assert power_residual(M, ours, 1.0) <= 1e-2 * theirs
    assert compared >= (kind != "near_degenerate")  # twins 1e-6 apart: TorchJD's residual is > 1e-6


def test_nash_mtl_step_norm_and_torchjd_default_clip() -> None:
    """||d||^2 = alpha^T M alpha = T exactly; TorchJD's max_norm = 1 (default) returns alpha / sqrt(T)."""
    G = gradients("random", 4, 5)
    alpha = NashMTL()(torch.tensor(G.T @ G)).coefficients.numpy()
    assert np.linalg.norm(G @ alpha) == pytest.approx(np.sqrt(5), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = TorchJDNashMTL(n_tasks=5, optim_niter=50).weighting(torch.tensor(G.T)).numpy()
    np.testing.assert_allclose(clipped, alpha / np.sqrt(5), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 3.0])
def test_every_task_improves_by_its_fair_share(alpha: float) -> None:
    """<g_i, d> = w_i^(-1/alpha) for every task (the alpha-fair optimality condition)."""
    for kind in KINDS:
        G = gradients(kind, 5, 30)
        w = FairGrad(alpha=alpha)(G.T @ G).coefficients.numpy()
        assert np.all(w > 0)
        np.testing.assert_allclose(G.T @ (G @ w), w ** (-1 / alpha), rtol=1e-9)
    np.testing.assert_array_equal(
        FairGrad(alpha=1.0)(G.T @ G).coefficients.numpy(), NashMTL()(G.T @ G).coefficients.numpy()
    )


def test_scale_duplicates_and_single_task() -> None:
    G = gradients("random", 6, 8)
    M = G.T @ G
    for alpha in (0.5, 2.0):
        p = 1 / alpha
        w = FairGrad(alpha=alpha)(M).coefficients.numpy()
        for scale in (1e-12, 1e12):  # w scales as scale^(-1/(1+p))
            scaled = FairGrad(alpha=alpha)(scale * M)
            assert scaled.info["fairgrad_converged"] == 1.0
            np.testing.assert_allclose(scaled.coefficients.numpy(), w * scale ** (-1 / (1 + p)), rtol=1e-9)
        np.testing.assert_allclose(
            FairGrad(alpha=alpha)(np.array([[4.0]])).coefficients.numpy(), 4 ** (-1 / (1 + p))
        )
    Gd = gradients("duplicated", 7, 6)  # tasks 0..2 repeated as 4..5: twins get equal weights
    w = NashMTL()(Gd.T @ Gd).coefficients.numpy()
    np.testing.assert_allclose(w[4:], w[:2], rtol=1e-9)
    rank_one = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    out = NashMTL()(rank_one)
    assert out.info["nash_mtl_converged"] == 1.0
    np.testing.assert_allclose(out.coefficients.numpy(), 1 / (np.sqrt(3) * np.array([1.0, 2.0, 3.0])))


@pytest.mark.parametrize("balancer", [NashMTL(), FairGrad(alpha=0.5), FairGrad(alpha=4.0)])
def test_no_solution_is_reported_never_silent(balancer: NashMTL | FairGrad) -> None:
    """Opposite tasks (g_2 = -g_1) are Pareto stationary: no positive solution exists. The solver says
    so (converged 0) and returns a positive, finite point; all-zero M returns ones."""
    prefix = balancer.name
    for M in (
        np.array([[1.0, -1.0], [-1.0, 1.0]]),
        np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]),
    ):
        out = balancer(M)
        c = out.coefficients.numpy()
        assert out.info[f"{prefix}_converged"] == 0.0 and out.info[f"{prefix}_residual"] >= 0.5
        assert np.all(np.isfinite(c)) and np.all(c > 0)
    out = balancer(np.zeros((3, 3)))
    np.testing.assert_array_equal(out.coefficients.numpy(), np.ones(3))


def test_nash_unbounded_flag_and_iteration_cap() -> None:
    out = NashMTL()(np.array([[1.0, -1.0], [-1.0, 1.0]]))
    assert out.info["nash_mtl_unbounded"] == 1.0
    G = gradients("near_degenerate", 8, 20)
    capped = FairGrad(alpha=2.0, max_iter=1)(G.T @ G)
    assert capped.info["fairgrad_converged"] == 0.0 and capped.info["fairgrad_iterations"] == 1.0
    assert np.all(capped.coefficients.numpy() > 0)


def test_warm_start_from_the_solution_takes_at_most_one_step() -> None:
    G = gradients("random", 9, 40)
    M = G.T @ G
    w, cold = solve_power_equation(M, 0.5, 1e-12, 100)
    again, warm = solve_power_equation(M, 0.5, 1e-12, 100, init=w)
    assert warm.converged and warm.iterations <= 1 < cold.iterations
    np.testing.assert_allclose(again, w, rtol=1e-12)
    with pytest.raises(ValueError, match="init must be a positive"):
        solve_power_equation(M, 0.5, 1e-12, 100, init=-w)


def test_bad_options_are_named() -> None:
    for alpha in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="balancer.alpha must be > 0; got"):
            FairGrad(alpha=alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"balancer.alpha must be > 0; got 0$"):
        FairGrad(alpha=0)
    with pytest.raises(ValueError, match="balancer.tol must be a finite number >= 0"):
        NashMTL(tol=-1.0)
    with pytest.raises(ValueError, match="balancer.max_iter must be an integer >= 1"):
        FairGrad(max_iter=0)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_gradient_norms_over_eight_orders_of_magnitude(alpha: float) -> None:
    """Each task's weight is judged against its own scale (M_ii^(-1/(1+p))), not the largest one's."""
    rng = np.random.default_rng(11)
    for _ in range(5):
        G = (rng.standard_normal((40, 8)) + 2.0) * np.logspace(-4, 4, 8)  # positively correlated
        out = FairGrad(alpha=alpha)(G.T @ G)
        assert out.info["fairgrad_converged"] == 1.0 and out.info["fairgrad_unbounded"] == 0.0
        assert power_residual(G.T @ G, out.coefficients.numpy(), 1 / alpha) <= 1e-9


def test_a_pareto_stationary_subset_is_never_reported_converged() -> None:
    """g_3 = -(g_1 + 2 g_2): some task of the subset has <g_i, d> <= 0 for every w, residual >= 1, and
    the step falls back to uniform weights."""
    rng = np.random.default_rng(12)
    for _ in range(5):
        G = rng.standard_normal((20, 6))
        G[:, 2] = -(G[:, 0] + 2.0 * G[:, 1])
        for balancer in (NashMTL(), FairGrad(alpha=0.5), FairGrad(alpha=3.0)):
            out = balancer(G.T @ G)
            assert out.info[f"{balancer.name}_converged"] == 0.0
            assert out.info[f"{balancer.name}_residual"] >= 1.0 - 1e-5  # 1 up to the iterate's rounding
            # No solution: the documented fallback, uniform weights, not the last iterate's huge ones.
            assert out.info[f"{balancer.name}_fallback"] == 1.0
            np.testing.assert_array_equal(out.coefficients.numpy(), np.full(6, 1.0 / 6))
