"""UPGrad, DualProj, CAGrad and IMTL-G against TorchJD 0.18's weightings, an independent NNLS oracle and
the properties that a wrong implementation breaks."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from torchjd._linalg import QuadprogProjector
from torchjd.aggregation import CAGradWeighting, DualProjWeighting, IMTLGWeighting, UPGradWeighting

from dist_mtl.balancers import dual_cone, imtl_g
from dist_mtl.balancers.cagrad import CAGrad
from dist_mtl.balancers.dual_cone import project_dual_cone, project_one
from dist_mtl.balancers.dualproj import DualProj
from dist_mtl.balancers.imtl_g import IMTLG
from dist_mtl.balancers.upgrad import UPGrad
from dist_mtl.solve import step_events


def conflicting(seed: int, T: int, P: int | None = None) -> np.ndarray:
    """P x T gradients around a shared direction, 30% of them flipped (many conflicts)."""
    rng = np.random.default_rng(seed)
    P = P or 2 * T + 5
    G = rng.standard_normal((P, 1)) + rng.standard_normal((P, T)) * rng.uniform(0.3, 2, T)
    return G * np.where(rng.random(T) < 0.3, -1.0, 1.0)


def gradients(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return conflicting(seed, 12)
    if kind == "low_rank":  # 15 tasks in 6 dimensions
        return conflicting(seed, 15, P=6)
    if kind == "duplicated":  # every task twice
        G = conflicting(seed, 6)
        return np.hstack([G, G])
    if kind == "near_duplicates":
        G = conflicting(seed, 6)
        return np.hstack([G, G + 1e-7 * rng.standard_normal(G.shape)])
    if kind == "spread_norms":  # norms over six orders of magnitude
        return conflicting(seed, 8) * 10.0 ** rng.uniform(-3, 3, 8)
    raise ValueError(kind)


KINDS = ["random", "low_rank", "duplicated", "near_duplicates", "spread_norms"]


def direction_error(G: np.ndarray, c: np.ndarray, ref: np.ndarray) -> float:
    """||G (c - ref)|| / ||G ref||: directions, since c is not unique when the gradients are dependent."""
    return float(np.linalg.norm(G @ (c - ref)) / np.linalg.norm(G @ ref))


def nnls_projection(G: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Projection of x onto {y : G^T y >= 0} by Moreau: x minus its projection onto -cone(G) (NNLS on G)."""
    mu, _ = nnls(G, -x, maxiter=50 * G.shape[1])
    return x + G @ mu


# ---------------------------------------------------------------------------------------------- TorchJD


@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_and_dualproj_equal_torchjd_with_its_regularisation(kind: str) -> None:
    """norm_eps = reg_eps = 1e-4 is TorchJD's QuadprogProjector: the same QP, so the same weights."""
    G = gradients(kind)
    M = G.T @ G
    for ours, ref in (
        (UPGrad(norm_eps=1e-4, reg_eps=1e-4), UPGradWeighting()),
        (DualProj(1e-4, 1e-4), DualProjWeighting()),
    ):
        out = ours(M)
        expected = ref(torch.tensor(M)).numpy()
        np.testing.assert_allclose(
            out.coefficients.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max()
        )
        assert out.info["solver_converged"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_projection_equals_torchjd_with_a_negligible_ridge(seed: int) -> None:
    """Default (no regularisation) against quadprog on M / tr(M) + 1e-13 I, where M is well conditioned.
    With norms spread over decades that ridge is not negligible; the NNLS oracle covers those below."""
    G = gradients("random", seed)
    M = G.T @ G
    projector = QuadprogProjector(norm_eps=0.0, reg_eps=1e-13)
    for ours, ref in (
        (UPGrad(), UPGradWeighting(projector=projector)),
        (DualProj(), DualProjWeighting(projector=projector)),
    ):
        expected = ref(torch.tensor(M)).numpy()
        np.testing.assert_allclose(ours(M).coefficients.numpy(), expected, rtol=1e-6)


def test_regularisation_is_what_separates_the_default_from_torchjd() -> None:
    """The default is the exact projection: TorchJD's 1e-4 ridge moves UPGrad's direction by ~1e-3 here."""
    G = gradients("random")
    M = G.T @ G
    exact, ridged = UPGrad()(M).coefficients.numpy(), UPGradWeighting()(torch.tensor(M)).numpy()
    assert 1e-5 < direction_error(G, exact, ridged) < 1e-1
    assert (M @ exact).min() >= -1e-12 * np.abs(M).max()  # the exact one conflicts with no task


@pytest.mark.parametrize("kind", KINDS)
def test_imtl_g_equals_torchjd(kind: str) -> None:
    G = gradients(kind)
    M = G.T @ G
    expected = IMTLGWeighting()(torch.tensor(M)).numpy()
    c = IMTLG()(M).coefficients.numpy()
    if kind == "near_duplicates":  # pinv's cut-off falls between the twins' tiny eigenvalues: directions
        assert direction_error(G, c, expected) < 1e-6
    else:  # M's condition number reaches 1e12 for spread norms: eigh and SVD agree to ~1e-7 there
        rtol = 1e-5 if kind == "spread_norms" else 1e-8
        np.testing.assert_allclose(c, expected, rtol=rtol, atol=1e-12)


def cagrad_objective(M: np.ndarray, c: float, w: np.ndarray) -> float:
    T = M.shape[0]
    k = c * math.sqrt(M.sum()) / T
    return float(w @ M.sum(axis=1) / T + k * math.sqrt(max(float(w @ M @ w), 0.0)))


def cagrad_dual_weights(M: np.ndarray, c: float, coefficients: np.ndarray) -> np.ndarray:
    """w from c = 1/T + (sqrt(phi) / ||g_w||) w: (c - 1/T) normalised to the simplex."""
    w = coefficients - 1.0 / M.shape[0]
    return w / w.sum()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c", [0.4, 2.0])
def test_cagrad_against_torchjd(kind: str, c: float) -> None:
    """TorchJD solves with cvxpy/Clarabel to ~1e-8 in F: our dual objective is never worse by more than
    1e-7 of ||g0||^2 and the directions agree within 2e-3 (Clarabel's w is only that accurate)."""
    G = gradients(kind)
    M = G.T @ G
    out = CAGrad(c=c)(M)
    ours = out.coefficients.numpy()
    expected = CAGradWeighting(c=c)(torch.tensor(M / np.trace(M))).numpy()
    assert out.info["cagrad_converged"] == 1.0
    if not expected.any():  # TorchJD's Pareto-stationary branch: ||g_w|| < 1e-4 sqrt(tr M)
        if ours.any():  # where this one keeps the formula: ||g_w|| is small but not at rounding level
            w = cagrad_dual_weights(M, c, ours)
            assert 0.0 < math.sqrt(w @ M @ w) < 1e-4 * math.sqrt(np.trace(M))
        else:
            assert out.info["degenerate_pareto_stationary"] == 1.0
        return
    g0_sq = M.sum() / M.shape[0] ** 2
    F_ours = cagrad_objective(M, c, cagrad_dual_weights(M, c, ours))
    F_ref = cagrad_objective(M, c, cagrad_dual_weights(M, c, expected))
    assert F_ours <= F_ref + 1e-7 * g0_sq
    assert direction_error(G, ours, expected) < 2e-3


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_projections_satisfy_kkt_and_match_nnls(kind: str) -> None:
    """Each w_i: w_i >= e_i, (M w_i) >= 0, complementarity; G w_i equals NNLS's projection of g_i."""
    G = gradients(kind)
    M = G.T @ G
    T = M.shape[0]
    W, info = project_dual_cone(M, np.eye(T), 1e-10, 10_000)
    assert info.converged and info.gap <= 1e-10 and info.violation <= 1e-10
    n = np.sqrt(np.diag(M))
    Y = W @ M / np.outer(n, n)  # row i: <g_j, d_i> / (||g_j|| ||g_i||)
    assert (W - np.eye(T)).min() >= 0.0
    assert Y.min() >= -1e-10
    assert np.abs((W - np.eye(T)) * n[None, :] * Y).max() <= 1e-9 * n.max()
    for i in range(T):
        oracle = nnls_projection(G, G[:, i])
        assert np.linalg.norm(G @ W[i] - oracle) <= 1e-7 * np.linalg.norm(G[:, i])
    d = G @ UPGrad()(M).coefficients.numpy()
    np.testing.assert_allclose(d, G @ W.mean(axis=0), rtol=1e-12, atol=1e-14 * np.linalg.norm(d))


@pytest.mark.parametrize(("rounds", "cholesky_from"), [(0, 96), (1, 96), (15, 1), (0, 1)])
def test_every_solver_path_reaches_the_same_projections(rounds: int, cholesky_from: int, monkeypatch) -> None:
    """Primal-dual rounds cut short: every problem finishes in the Lawson-Hanson fallback;
    cholesky_from = 1: every passive block solved by Cholesky one by one (the large-T path)."""
    monkeypatch.setattr(dual_cone, "_PDAS_ROUNDS", rounds)
    monkeypatch.setattr(dual_cone, "_CHOLESKY_FROM", cholesky_from)
    for kind in KINDS:
        G = gradients(kind, seed=2)
        M = G.T @ G
        T = M.shape[0]
        W, info = project_dual_cone(M, np.eye(T), 1e-10, 10_000)
        assert info.converged, kind
        for i in range(T):
            oracle = nnls_projection(G, G[:, i])
            assert np.linalg.norm(G @ W[i] - oracle) <= 1e-7 * np.linalg.norm(G[:, i]), kind


def no_cholesky(*args, **kwargs):
    raise np.linalg.LinAlgError("not positive definite")


@pytest.mark.parametrize(
    ("tail", "split_cost", "lu", "cholesky_from"),
    [
        (0, 0.0, False, 96),
        (0, 1e30, False, 96),
        (10_000, 1e30, False, 96),
        (0, 0.0, True, 96),
        (10_000, 1e30, True, 96),
        (0, 1e30, False, 1),
        (0, 1e30, True, 1),
    ],
)
def test_gathered_and_per_problem_rounds_reach_the_nnls_projections(
    tail: int, split_cost: float, lu: bool, cholesky_from: int, monkeypatch
) -> None:
    """The paths of the primal-dual rounds: gathered blocks in one padded chunk or split by |P|
    (split_cost 0: whenever sizes differ), the problems left finished one at a time (tail 10_000: every
    problem from the first round), every block gathered and solved alone (cholesky_from 1: the large-T
    path), and the LU fallbacks where Cholesky (batched) or dposv (one block) reports a block that is
    not positive definite. Each reaches NNLS's projections."""
    monkeypatch.setattr(dual_cone, "_TAIL", tail)
    monkeypatch.setattr(dual_cone, "_SPLIT_COST", split_cost)
    monkeypatch.setattr(dual_cone, "_CHOLESKY_FROM", cholesky_from)
    if lu:
        monkeypatch.setattr(dual_cone.np.linalg, "cholesky", no_cholesky)
        monkeypatch.setattr(dual_cone, "dposv", lambda a, b, *_: (a, b, 1))
    cases = [gradients(kind, seed=1) for kind in KINDS] + [conflicting(3, 40)]
    for G in cases:
        M = G.T @ G
        T = M.shape[0]
        W, info = project_dual_cone(M, np.eye(T), 1e-10, 10_000)
        assert info.converged and info.gap <= 1e-10 and info.violation <= 1e-10
        assert (W - np.eye(T)).min() >= 0.0
        for i in range(T):
            oracle = nnls_projection(G, G[:, i])
            assert np.linalg.norm(G @ W[i] - oracle) <= 1e-7 * np.linalg.norm(G[:, i])


def test_gathered_blocks_agree_with_the_masked_blocks(monkeypatch) -> None:
    """`_solve_gathered` (flat gathers, Cholesky) against `_solve_passive` (masks, LU) on the same passive
    sets; whole solves through the rounds and through Lawson-Hanson alone agree to rounding at T = 40."""
    G = conflicting(4, 40)
    M = G.T @ G
    Mn = M / M.diagonal().max()
    rng = np.random.default_rng(0)
    passive = rng.random((40, 40)) < 0.45
    passive[0] = False  # an empty passive set: z = 0
    Y0 = rng.standard_normal((40, 40))
    rhs = np.hstack([-Y0, np.zeros_like(Y0)])
    gathered = dual_cone._solve_gathered(
        dual_cone._bordered(dual_cone._ridged(Mn)), rhs, passive, passive.sum(axis=1)
    )
    masked = dual_cone._solve_passive(Mn, Y0, passive)
    assert not gathered[0].any() and not gathered[~passive].any()
    np.testing.assert_allclose(gathered, masked, rtol=1e-9, atol=1e-9 * np.abs(masked).max())
    W, info = project_dual_cone(M, np.eye(40), 1e-10, 10_000)
    monkeypatch.setattr(dual_cone, "_PDAS_ROUNDS", 0)  # every problem in Lawson-Hanson (masked blocks)
    W_masked, info_masked = project_dual_cone(M, np.eye(40), 1e-10, 10_000)
    assert info.converged and info_masked.converged
    n = np.linalg.norm(G, axis=0)
    assert np.linalg.norm(G @ (W - W_masked).T, axis=0).max() <= 1e-10 * n.max()


def test_upgrad_at_forty_tasks_equals_torchjd_without_its_ridge() -> None:
    """T = 40, strongly conflicting (bench/solvers.py's regime): quadprog on M / tr(M) with reg_eps 0,
    the exact projection, gives the same coefficients."""
    for seed in (0, 1):
        G = conflicting(seed, 40)
        M = G.T @ G
        projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
        expected = UPGradWeighting(projector=projector)(torch.tensor(M)).numpy()
        out = UPGrad()(M)
        assert out.info["solver_converged"] == 1.0
        np.testing.assert_allclose(out.coefficients.numpy(), expected, rtol=1e-6, atol=1e-9 * expected.max())


def test_single_projection_path_matches_the_batched_solver_and_nnls() -> None:
    """`project_one` (DualProj's path) against `project_dual_cone` with B = 1 and the NNLS oracle, for the
    mean and for other bounds u (mixed signs, a single task's e_i)."""
    for kind in KINDS:
        for seed in (0, 1):
            G = gradients(kind, seed)
            M = G.T @ G
            T = M.shape[0]
            rng = np.random.default_rng(seed)
            for u in (np.full(T, 1.0 / T), rng.standard_normal(T), np.eye(T)[seed]):
                w, info = project_one(M, u, 1e-10, 10_000)
                W, batched = project_dual_cone(M, u[None, :], 1e-10, 10_000)
                assert info.converged and info.unconverged == 0, kind
                assert info.gap <= 1e-10 and info.violation <= 1e-10, kind
                assert (w - u).min() >= 0.0, kind
                scale = np.linalg.norm(G @ u)
                assert np.linalg.norm(G @ (w - W[0])) <= 1e-9 * scale, kind
                assert np.linalg.norm(G @ w - nnls_projection(G, G @ u)) <= 1e-7 * scale, kind


@pytest.mark.parametrize("how", ["rounds", "not_positive_definite"])
def test_single_projection_falls_back_to_the_batched_solver(how: str, monkeypatch) -> None:
    """PDAS cut short (a cycle) or a passive block LAPACK cannot factor: `project_dual_cone` takes over from
    scratch, its iterations added to the rounds spent; the answer is the same projection."""
    if how == "rounds":
        monkeypatch.setattr(dual_cone, "_PDAS_ROUNDS", 1)
    else:
        monkeypatch.setattr(dual_cone, "dposv", lambda a, b, *_: (a, b, 1))
    calls = []
    batched = dual_cone.project_dual_cone
    monkeypatch.setattr(dual_cone, "project_dual_cone", lambda *a: calls.append(a) or batched(*a))
    G = conflicting(7, 30)
    M = G.T @ G
    u = np.full(30, 1.0 / 30)
    w, info = project_one(M, u, 1e-10, 10_000)
    assert len(calls) == 1 and info.converged and info.iterations > 1
    assert np.linalg.norm(G @ w - nnls_projection(G, G @ u)) <= 1e-7 * np.linalg.norm(G @ u)


def test_single_projection_detects_a_cycle(monkeypatch) -> None:
    """Near-duplicate tasks make PDAS come back to a passive set it had: the general solver takes over at
    once rather than after _PDAS_ROUNDS rounds, and finds the projection."""
    spent = []
    batched = dual_cone.project_dual_cone
    monkeypatch.setattr(
        dual_cone, "project_dual_cone", lambda M, U, tol, n: spent.append(10_000 - n) or batched(M, U, tol, n)
    )
    G = gradients("near_duplicates", 1)
    M = G.T @ G
    u = np.full(12, 1.0 / 12)
    w, info = project_one(M, u, 1e-10, 10_000)
    assert len(spent) == 1 and spent[0] < dual_cone._PDAS_ROUNDS and info.converged
    assert np.linalg.norm(G @ w - nnls_projection(G, G @ u)) <= 1e-7 * np.linalg.norm(G @ u)


def test_dualproj_out_of_iterations_returns_the_feasible_start() -> None:
    """max_iter = 1: one round, not converged, the start u (w >= u, feasible), flagged and counted."""
    G = conflicting(6, 40)
    M = G.T @ G
    out = DualProj(max_iter=1)(M)
    assert out.info["solver_converged"] == 0.0 and out.info["solver_unconverged_projections"] == 1.0
    assert out.info["solver_iterations"] == 1.0 and out.info["solver_violation"] > 0.0
    np.testing.assert_array_equal(out.coefficients.numpy(), np.full(40, 1 / 40))
    assert step_events(out.info)["unconverged_solves"] == 1
    assert DualProj()(M).info["solver_converged"] == 1.0


def test_dualproj_is_the_projection_of_the_mean_gradient() -> None:
    for kind in KINDS:
        G = gradients(kind, seed=3)
        M = G.T @ G
        c = DualProj()(M).coefficients.numpy()
        g0 = G.mean(axis=1)
        oracle = nnls_projection(G, g0)
        assert np.linalg.norm(G @ c - oracle) <= 1e-7 * np.linalg.norm(g0), kind
        assert c.min() >= 1.0 / M.shape[0] - 1e-15


def test_no_conflict_means_no_change() -> None:
    """Gradients with non-negative inner products are their own projections: UPGrad, DualProj = mean."""
    G = np.abs(np.random.default_rng(0).standard_normal((9, 6)))
    M = G.T @ G
    for balancer in (UPGrad(), DualProj()):
        np.testing.assert_allclose(balancer(M).coefficients.numpy(), np.full(6, 1 / 6), rtol=1e-14)


def test_cagrad_solves_its_primal() -> None:
    """Strong duality: min_i <g_i, d> equals F(w*), and d is on the ball's boundary ||d - g0|| = c ||g0||."""
    for seed, c in ((0, 0.2), (1, 0.5), (2, 0.9), (3, 3.0)):
        G = conflicting(seed, 10)
        M = G.T @ G
        coefficients = CAGrad(c=c)(M).coefficients.numpy()
        g0, d = G.mean(axis=1), G @ coefficients
        F = cagrad_objective(M, c, cagrad_dual_weights(M, c, coefficients))
        assert abs((M @ coefficients).min() - F) <= 1e-8 * np.linalg.norm(g0) ** 2
        assert abs(np.linalg.norm(d - g0) - c * np.linalg.norm(g0)) <= 1e-10 * np.linalg.norm(g0)


def test_cagrad_with_c_zero_is_the_mean() -> None:
    M = gradients("random").T @ gradients("random")
    np.testing.assert_array_equal(CAGrad(c=0.0)(M).coefficients.numpy(), np.full(12, 1 / 12))


def exact_solve(M: np.ndarray, b: np.ndarray) -> np.ndarray:
    """M^-1 b in rational arithmetic (Gauss-Jordan on the floats' exact values), rounded once at the end."""
    T = len(b)
    A = [[Fraction(float(M[i, j])) for j in range(T)] + [Fraction(float(b[i]))] for i in range(T)]
    for k in range(T):
        p = max(range(k, T), key=lambda i: abs(A[i][k]))
        A[k], A[p] = A[p], A[k]
        for i in range(T):
            if i != k and A[i][k]:
                f = A[i][k] / A[k][k]
                A[i] = [a - f * c for a, c in zip(A[i], A[k], strict=True)]
    return np.array([float(A[i][T] / A[i][i]) for i in range(T)])


def test_imtl_g_routes() -> None:
    """Full rank and well conditioned: the Cholesky route (rank T), equal to the eigendecomposition's
    pseudo-inverse; rank deficient or near duplicates: the pseudo-inverse route with its cut-off."""
    for kind, seed in (("random", 0), ("random", 1), ("spread_norms", 2)):
        G = gradients(kind, seed)
        M = G.T @ G
        Mn = M / M.diagonal().max()
        n = np.sqrt(Mn.diagonal())
        v, rank = imtl_g._solve_full_rank(Mn, n)
        assert v is not None and rank == M.shape[0], kind
        w, rank = imtl_g._solve_pinv(Mn, n)
        assert rank == M.shape[0], kind
        np.testing.assert_allclose(v / v.sum(), w / w.sum(), rtol=1e-9 if kind == "random" else 1e-6)
    for kind in ("low_rank", "duplicated", "near_duplicates"):
        G = gradients(kind)
        M = G.T @ G
        Mn = M / M.diagonal().max()
        assert imtl_g._solve_full_rank(Mn, np.sqrt(Mn.diagonal())) == (None, 0), kind
        assert IMTLG()(M).info["imtl_g_rank"] < M.shape[0], kind


def test_imtl_g_is_exact_where_conditioning_is_poor() -> None:
    """Norms over six decades (cond ~1e10, still the Cholesky route): c to ~1e-15 of the exact rational
    solution, where the eigendecomposition and TorchJD's SVD pseudo-inverse lose ~cond eps."""
    G = gradients("spread_norms", 1)
    M = G.T @ G
    n = np.sqrt(M.diagonal())
    v = exact_solve(M, n)
    exact = v / v.sum()
    out = IMTLG()(M)
    assert out.info["imtl_g_rank"] == 8.0 and out.info["imtl_g_residual"] < 1e-12
    assert np.abs(out.coefficients.numpy() - exact).max() <= 1e-13 * np.abs(exact).max()
    theirs = IMTLGWeighting()(torch.tensor(M)).numpy()
    assert np.abs(theirs - exact).max() <= 1e-6 * np.abs(exact).max()  # TorchJD agrees, less closely


def test_imtl_g_gives_equal_projections_on_the_unit_gradients() -> None:
    G = conflicting(4, 10)
    M = G.T @ G
    c = IMTLG()(M).coefficients.numpy()
    projections = (M @ c) / np.sqrt(np.diag(M))
    np.testing.assert_allclose(projections, projections[0], rtol=1e-10)
    assert abs(c.sum() - 1.0) < 1e-12


BALANCERS = [UPGrad(), DualProj(), CAGrad(c=0.5), IMTLG()]


@pytest.mark.parametrize("balancer", BALANCERS, ids=lambda b: b.name)
def test_permutation_equivariance_and_scale_invariance(balancer) -> None:
    G = conflicting(5, 9)
    M = G.T @ G
    c = balancer(M).coefficients.numpy()
    perm = np.random.default_rng(0).permutation(9)
    np.testing.assert_allclose(
        balancer(M[np.ix_(perm, perm)]).coefficients.numpy(), c[perm], rtol=1e-8, atol=1e-12
    )
    for s in (1e-12, 1e12):  # TorchJD's absolute norm_eps would return the mean at 1e-12 for UPGrad/DualProj
        np.testing.assert_allclose(balancer(s * M).coefficients.numpy(), c, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("balancer", BALANCERS, ids=lambda b: b.name)
def test_degenerate_gramians_give_finite_coefficients(balancer) -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal(5)
    cases = {
        "zero": np.zeros((4, 4)),
        "single": np.array([[2.5]]),
        "rank_one": np.outer([1.0, -2.0, 0.5], [1.0, -2.0, 0.5]),
        "identical": np.full((3, 3), 4.0),
        "opposite": np.outer([1.0, -1.0], [1.0, -1.0]) * (g @ g),
        "huge": 1e150 * (conflicting(0, 5).T @ conflicting(0, 5)),
        "tiny": 1e-150 * (conflicting(0, 5).T @ conflicting(0, 5)),
    }
    for name, M in cases.items():
        out = balancer(M)
        assert torch.isfinite(out.coefficients).all(), name
        assert all(math.isfinite(v) for v in out.info.values()), name
        if name == "single":  # CAGrad: d = g0 + c ||g0|| g / ||g|| = (1 + c) g
            expected = 1.0 + balancer.c if isinstance(balancer, CAGrad) else 1.0
            assert out.coefficients.item() == pytest.approx(expected), name


def test_unconverged_solve_is_reported_and_counted() -> None:
    """max_iter = 1 stops the projections early: a feasible point (w >= e_i), flagged and counted."""
    G = conflicting(6, 40)
    M = G.T @ G
    out = UPGrad(max_iter=1)(M)
    assert out.info["solver_converged"] == 0.0 and out.info["solver_unconverged_projections"] > 0
    assert step_events(out.info)["unconverged_solves"] == 1
    assert torch.isfinite(out.coefficients).all() and out.coefficients.min() >= 1 / 40 - 1e-15
    assert step_events(UPGrad()(M).info)["unconverged_solves"] == 0


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CAGrad(c=-1), "balancer.c must be >= 0"),
        (lambda: CAGrad(c=float("nan")), "balancer.c must be >= 0"),
        (lambda: CAGrad(c=True), "balancer.c must be >= 0"),
        (lambda: CAGrad(tol=-1.0), "balancer.tol"),
        (lambda: UPGrad(reg_eps=-1e-4), "balancer.reg_eps"),
        (lambda: UPGrad(norm_eps=float("inf")), "balancer.norm_eps"),
        (lambda: UPGrad(max_iter=0), "balancer.max_iter"),
        (lambda: DualProj(reg_eps=-1.0), "balancer.reg_eps"),
        (lambda: DualProj(tol=float("nan")), "balancer.tol"),
    ],
)
def test_validation_names_the_field(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
