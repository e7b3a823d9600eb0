"""PCGrad: the Gramian-only implementation against TorchJD (same orders) and Algorithm 1 on vectors."""

import numpy as np
import pytest
import torch
from torchjd.aggregation import PCGradWeighting

from dist_mtl.balancers.mamg import task_orders
from dist_mtl.balancers.pcgrad import PCGrad, project_coefficients
from dist_mtl.solve import solve_on_host


def gradients(kind: str, seed: int, T: int) -> np.ndarray:
    """P x T task gradients: random, low-rank, duplicated tasks or near-duplicates, ~30% flipped."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        G = rng.standard_normal((T + 10, T)) * rng.uniform(0.5, 2.0, size=T)
    elif kind == "low_rank":
        G = rng.standard_normal((20, 3)) @ rng.standard_normal((3, T))
    elif kind == "duplicated":
        G = rng.standard_normal((15, T // 2 + 1))
        G = np.concatenate([G, G[:, : T - G.shape[1]]], axis=1)
    else:  # near_degenerate
        G = rng.standard_normal((15, 1)) + 1e-6 * rng.standard_normal((15, T))
    return G * np.where(rng.random(T) < 0.3, -1.0, 1.0)


def torchjd_orders(T: int, seed: int) -> np.ndarray:
    """The per-task orders PCGradWeighting draws after torch.manual_seed(seed), without task i itself."""
    torch.manual_seed(seed)
    perms = [torch.randperm(T).numpy() for _ in range(T)]
    return np.array([[j for j in perm if j != i] for i, perm in enumerate(perms)], dtype=np.intp)


def direct_pcgrad(G: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Algorithm 1 literally: vectors, one task and one partner at a time; d = sum of g'_i."""
    projected = []
    for i in range(G.shape[1]):
        g = G[:, i].copy()
        for j in orders[i]:
            gj = G[:, j]
            if g @ gj < 0:
                g = g - (g @ gj) / (gj @ gj) * gj
        projected.append(g)
    return np.sum(projected, axis=0)


@pytest.mark.parametrize("kind", ["random", "low_rank", "duplicated", "near_degenerate"])
def test_equals_torchjd_given_the_same_orders(kind: str) -> None:
    for seed, T in ((0, 2), (1, 7), (2, 25)):
        M = gradients(kind, seed, T).T @ gradients(kind, seed, T)
        B, _ = project_coefficients(M, torchjd_orders(T, seed))
        torch.manual_seed(seed)
        expected = PCGradWeighting()(torch.tensor(M)).numpy()
        np.testing.assert_allclose(B.sum(axis=0), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_equals_algorithm_one_on_explicit_vectors() -> None:
    for seed, T in ((0, 3), (1, 8), (2, 20)):
        G = gradients("random", seed, T)
        out = PCGrad(seed=seed)(torch.tensor(G.T @ G))
        expected = direct_pcgrad(G, task_orders(T, seed, 0))
        d = G @ out.coefficients.numpy()
        np.testing.assert_allclose(d, expected, atol=1e-9 * np.linalg.norm(expected))
        assert out.info["pcgrad_projections"] > 0


def test_blocks_do_not_change_the_result() -> None:
    G = gradients("random", 3, 90)
    M = G.T @ G
    orders = task_orders(90, 4, 0)
    reference, n = project_coefficients(M, orders, block=orders.shape[1])  # one block: no B M product
    for block in (1, 7, 64):
        B, m = project_coefficients(M, orders, block=block)
        assert m == n
        np.testing.assert_allclose(B, reference, atol=1e-12 * np.abs(reference).max())


def test_each_projection_removes_the_conflict_with_its_partner() -> None:
    """After projecting g'_i onto the normal plane of g_j, <g'_i, g_j> = 0; untouched rows stay.

    A later projection may bring back a conflict with an earlier partner (PCGrad's known behaviour with
    three or more tasks); the last test shows one. With two tasks the final rows never conflict.
    """
    G = gradients("random", 5, 10)
    M = G.T @ G
    orders = task_orders(10, 6, 0)
    before, _ = project_coefficients(M, orders[:, :0])
    touched = 0
    for r in range(orders.shape[1]):
        after, _ = project_coefficients(M, orders[:, : r + 1])
        for i in range(10):
            j = orders[i, r]
            if before[i] @ M[:, j] < 0.0:
                assert abs(after[i] @ M[:, j]) <= 1e-12 * np.sqrt(M[j, j] * (after[i] @ M @ after[i]))
                touched += 1
            else:
                np.testing.assert_array_equal(after[i], before[i])
        before = after
    assert touched > 0
    two = np.array([[1.0, -1.0], [0.0, 1.0]])  # columns g_1 = (1, 0), g_2 = (-1, 1) conflict
    M2 = two.T @ two
    B, projections = project_coefficients(M2, task_orders(2, 0, 0))
    assert projections == 2 and B[0] @ M2[:, 1] >= -1e-12 and B[1] @ M2[:, 0] >= -1e-12


def test_a_later_projection_can_bring_back_an_earlier_conflict() -> None:
    found = False
    for seed in range(20):
        G = gradients("random", seed, 6)
        M = G.T @ G
        orders = task_orders(6, seed, 0)
        B, _ = project_coefficients(M, orders)
        for i in range(6):
            for r, j in enumerate(orders[i][:-1]):
                prefix, _ = project_coefficients(M, orders[:, : r + 1])
                was_projected = project_coefficients(M, orders[:, :r])[0][i] @ M[:, j] < 0.0
                found |= bool(was_projected and prefix[i] @ M[:, j] > -1e-12 and B[i] @ M[:, j] < -1e-9)
        if found:
            break
    assert found


def test_without_conflicts_it_is_the_sum_and_one_task_is_itself() -> None:
    G = np.abs(np.random.default_rng(4).standard_normal((6, 5)))
    out = PCGrad(seed=1)(G.T @ G)
    assert out.info["pcgrad_projections"] == 0.0
    np.testing.assert_array_equal(out.coefficients.numpy(), np.ones(5))
    np.testing.assert_array_equal(PCGrad()(np.array([[2.0]])).coefficients.numpy(), [1.0])


def test_degenerate_gramians_give_finite_coefficients() -> None:
    G = gradients("random", 8, 6)
    cases = [np.zeros((4, 4)), 1e12 * G.T @ G, 1e-12 * G.T @ G, np.outer([1.0, -2.0, 3.0], [1.0, -2.0, 3.0])]
    for M in cases:
        assert np.isfinite(PCGrad(seed=2)(M).coefficients.numpy()).all()
    small, large = PCGrad(seed=2)(1e-12 * G.T @ G), PCGrad(seed=2)(1e12 * G.T @ G)
    np.testing.assert_allclose(small.coefficients.numpy(), large.coefficients.numpy(), rtol=1e-9)


def test_orders_depend_on_seed_and_step_only_and_state_round_trips() -> None:
    G = gradients("random", 9, 12)
    M = torch.tensor(G.T @ G)
    a, b = PCGrad(seed=7), PCGrad(seed=7)
    first = []
    for _ in range(3):
        first.append(a(M).coefficients)
        a.advance()
    for expected in first:
        assert torch.equal(b(M).coefficients, expected)
        b.advance()
    assert not torch.equal(first[0], first[1])  # a new order every step
    assert not torch.equal(PCGrad(seed=8)(M).coefficients, first[0])
    resumed = PCGrad(seed=0)
    resumed.load_state_dict(a.state_dict() | {"step": 2})
    assert torch.equal(resumed(M).coefficients, first[2])
    assert a.state_dict() == {"seed": 7, "step": 3}


def test_a_call_is_pure_and_solve_on_host_advances() -> None:
    G = gradients("random", 10, 6)
    M = torch.tensor(G.T @ G)
    balancer = PCGrad(seed=3)
    once, twice = balancer(M), balancer(M)
    assert torch.equal(once.coefficients, twice.coefficients) and balancer.step == 0
    solve_on_host(balancer, M, torch.ones(6))
    assert balancer.step == 1


def test_bad_seed_and_state_are_named() -> None:
    with pytest.raises(ValueError, match="balancer.seed must be an integer >= 0; got -1"):
        PCGrad(seed=-1)
    with pytest.raises(ValueError, match="pcgrad state must have keys seed, step"):
        PCGrad().load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="pcgrad state step must be an integer >= 0"):
        PCGrad().load_state_dict({"seed": 0, "step": -2})
