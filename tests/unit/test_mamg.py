"""MAMG: the Gramian-only implementation against Algorithm 1 run on explicit vectors."""

import numpy as np
import pytest
import torch

from dist_mtl.balancers import MAMG, build_balancer
from dist_mtl.balancers.mamg import clip_coefficients, task_orders
from dist_mtl.solve import solve_on_host


def conflicting_gradients(seed: int, T: int, P: int = 15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((P, 1)) + rng.standard_normal((P, T)) * rng.uniform(0.5, 2.0, size=T)
    return G * np.where(rng.random(T) < 0.4, -1.0, 1.0)


def direct_mamg(G: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Algorithm 1 (Eq. 2-4) literally: vectors, one task and one partner at a time."""
    clipped = []
    for i in range(G.shape[1]):
        g = G[:, i].copy()
        for j in orders[i]:
            gj = G[:, j]
            if g @ gj < 0:
                P = g - gj
                delta = abs(g @ g - gj @ gj) / np.linalg.norm(P)
                g = g - delta * P / np.linalg.norm(P)
        clipped.append(g)
    return np.mean(clipped, axis=0)


def test_equals_algorithm_one_on_explicit_vectors() -> None:
    for seed, T in ((0, 3), (1, 8), (2, 20)):
        G = conflicting_gradients(seed, T)
        balancer = MAMG(seed=seed)
        orders = task_orders(T, seed, 0)
        out = balancer(torch.tensor(G.T @ G))
        expected = direct_mamg(G, orders)
        d = G @ out.coefficients.numpy()
        np.testing.assert_allclose(d, expected, atol=1e-8 * np.linalg.norm(expected))
        assert out.info["mamg_clips"] > 0


def test_every_clip_raises_the_inner_product_with_its_partner() -> None:
    G = conflicting_gradients(3, 10)
    M = G.T @ G
    orders = task_orders(10, 5, 0)
    before, clips_before, _ = clip_coefficients(M, orders[:, :0])
    clipped_rounds = 0
    for r in range(orders.shape[1]):
        after, clips_after, _ = clip_coefficients(M, orders[:, : r + 1])
        changed = np.flatnonzero(np.any(after != before, axis=1))
        assert len(changed) == clips_after - clips_before
        for i in changed:
            j = orders[i, r]
            assert before[i] @ M[:, j] < 0.0  # only conflicting pairs are touched
            assert after[i] @ M[:, j] > before[i] @ M[:, j]
        clipped_rounds += bool(len(changed))
        before, clips_before = after, clips_after
    assert clipped_rounds > 0


def test_without_conflicts_it_is_the_average() -> None:
    G = np.abs(np.random.default_rng(4).standard_normal((6, 5)))  # all inner products positive
    out = MAMG(seed=1)(G.T @ G)
    assert out.info["mamg_clips"] == 0.0 and out.info["mamg_conflicts"] == 0.0
    np.testing.assert_array_equal(out.coefficients.numpy(), np.full(5, 0.2))


def test_same_seed_same_result_and_state_restores_the_sequence() -> None:
    M = torch.tensor(conflicting_gradients(5, 12).T @ conflicting_gradients(5, 12))
    a, b = MAMG(seed=7), build_balancer("mamg", seed=7)
    first = []
    for _ in range(3):
        first.append(a(M).coefficients)
        a.advance()
    for expected in first:
        assert torch.equal(b(M).coefficients, expected)
        b.advance()
    assert not torch.equal(first[0], first[1])  # a new random order every step
    resumed = MAMG(seed=0)
    resumed.load_state_dict({"seed": 7, "step": 2})
    assert torch.equal(resumed(M).coefficients, first[2])
    assert a.state_dict() == {"seed": 7, "step": 3}


def test_a_call_is_pure_and_only_advance_moves_the_order() -> None:
    """Calling twice on the same M gives the same coefficients and leaves the state alone."""
    M = torch.tensor(conflicting_gradients(6, 12).T @ conflicting_gradients(6, 12))
    balancer = MAMG(seed=3)
    once, twice = balancer(M), balancer(M)
    assert torch.equal(once.coefficients, twice.coefficients) and once.info == twice.info
    assert balancer.state_dict() == {"seed": 3, "step": 0}
    balancer.advance()
    assert balancer.state_dict() == {"seed": 3, "step": 1}
    assert not torch.equal(balancer(M).coefficients, once.coefficients)


def test_solve_on_host_advances_only_adopted_steps() -> None:
    M = torch.tensor(conflicting_gradients(7, 6).T @ conflicting_gradients(7, 6))
    balancer = MAMG(seed=1)
    solve_on_host(balancer, M, torch.ones(6))
    assert balancer.step == 1
    solve_on_host(balancer, M, torch.full((6,), float("nan")))  # skipped: the balancer is not called
    assert balancer.step == 1


def test_orders_are_permutations_of_the_other_tasks() -> None:
    orders = task_orders(6, seed=3, step=11)
    for i, row in enumerate(orders):
        assert sorted(row.tolist()) == [j for j in range(6) if j != i]
    assert np.array_equal(orders, task_orders(6, seed=3, step=11))
    assert not np.array_equal(orders, task_orders(6, seed=3, step=12))


def test_bad_state_and_seed_are_named() -> None:
    with pytest.raises(ValueError, match="balancer.seed must be an integer >= 0"):
        MAMG(seed=-1)
    with pytest.raises(ValueError, match="mamg state must have keys seed, step"):
        MAMG().load_state_dict({"step": 1})
