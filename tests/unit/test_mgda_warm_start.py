"""MGDA's warm start: the same answer as a cold solve (to the solver's tolerance), fewer affine solves on
slowly changing Gramians, a state that only `advance` moves and that round-trips through a checkpoint."""

import io
from dataclasses import fields

import numpy as np
import pytest
import torch

from dist_mtl.balancers import MGDA, BalancerOutput, min_norm
from dist_mtl.balancers.mgda import gradient_normalizers
from dist_mtl.balancers.solver import DEFAULT_TOL, solve_min_norm


def conflicting_gradients(seed: int, T: int, P: int | None = None) -> np.ndarray:
    """bench/solvers.py's kind: a shared direction, a rank-8 part, noise, 30% of the tasks flipped."""
    rng = np.random.default_rng(seed)
    P = P or 2 * T + 64
    U = rng.standard_normal((P, 8)) / np.sqrt(P)
    G = 2.0 * U[:, :1] + U @ rng.standard_normal((8, T)) + 0.5 * rng.standard_normal((P, T)) / np.sqrt(P)
    return G * np.where(rng.random(T) < 0.3, -1.0, 1.0)


def drift(G: np.ndarray, steps: int, sigma: float, seed: int) -> list[np.ndarray]:
    """G_{k+1} = G_k + sigma * (mean column norm / sqrt(P)) * noise: Gramians of consecutive steps."""
    rng = np.random.default_rng(seed)
    out = [G]
    for _ in range(steps - 1):
        G = G + sigma * np.linalg.norm(G, axis=0).mean() / np.sqrt(G.shape[0]) * rng.standard_normal(G.shape)
        out.append(G)
    return out


def normalised_weights(M: np.ndarray, losses: np.ndarray, kind: str, c: np.ndarray) -> np.ndarray:
    """The simplex weights a of the normalised problem behind adopted coefficients c = a / n."""
    n, _ = gradient_normalizers(M, losses, kind)
    return c * n


def assert_optimal(M: np.ndarray, a: np.ndarray, best: float) -> None:
    """a is on the simplex, its value matches the cold solve's and it satisfies the simplex KKT conditions."""
    value, scale = float(a @ M @ a), float(np.max(np.diag(M)))
    assert a.min() >= 0.0 and abs(a.sum() - 1.0) < 1e-12
    assert abs(value - best) <= 1e-9 * max(best, 1e-13 * scale), (value, best)
    grad = M @ a
    assert grad.min() >= value - 1e-9 * max(value, 1e-13 * scale)
    np.testing.assert_allclose(grad[a > 0], value, rtol=1e-8, atol=1e-12 * scale)


@pytest.mark.parametrize("kind", ["none", "l2", "loss+"])
@pytest.mark.parametrize(("T", "sigma"), [(10, 1e-2), (40, 1e-3), (40, 1e-1), (150, 1e-2)])
def test_warm_and_cold_agree_on_slowly_changing_gramians(kind: str, T: int, sigma: float) -> None:
    rng = np.random.default_rng(T)
    warm = MGDA(normalization=kind)
    warm_iters = cold_iters = 0
    for k, G in enumerate(drift(conflicting_gradients(T, T), 8, sigma, seed=1)):
        M, losses = G.T @ G, rng.uniform(0.5, 2.0, T)
        out, ref = warm(M, losses), MGDA(normalization=kind)(M, losses)
        assert out.info["solver_warm_start"] == float(k > 0) and out.info["solver_converged"] == 1.0
        warm.advance()
        n, _ = gradient_normalizers(M, losses, kind)
        Mn = M / np.outer(n, n)
        a, a_ref = (normalised_weights(M, losses, kind, o.coefficients.numpy()) for o in (out, ref))
        assert_optimal(Mn, a, float(a_ref @ Mn @ a_ref))
        if k:
            warm_iters += out.info["solver_iterations"]
            cold_iters += ref.info["solver_iterations"]
    assert warm_iters <= cold_iters


def test_warm_start_saves_affine_solves_at_t1000() -> None:
    """The case warm starts exist for: ~800 of 1000 tasks in the support, small changes per step."""
    steps = drift(conflicting_gradients(0, 1000), 3, 1e-3, seed=2)
    b = MGDA()
    b(steps[0].T @ steps[0])
    b.advance()
    for G in steps[1:]:
        M = G.T @ G
        out = b(M)
        b.advance()
        cold, info = solve_min_norm(M)
        assert_optimal(M, out.coefficients.numpy(), float(cold @ M @ cold))
        assert out.info["solver_iterations"] * 4 <= info.iterations, (out.info, info)


def test_warm_start_from_a_wrong_support_still_converges() -> None:
    """Starts from unrelated problems (another M's support, every task, one bad vertex, the wrong twin of
    each near-duplicate pair) change the path, not the answer."""
    G = conflicting_gradients(3, 60)
    M = G.T @ G
    best = min_norm(M)[0].numpy()
    other = conflicting_gradients(4, 60)
    starts = {
        "other_problem": min_norm(other.T @ other)[0].numpy(),
        "all_tasks": np.ones(60),
        "worst_vertex": np.eye(60)[int(np.argmax(np.diag(M)))],
        "off_support": np.where(best > 0, 0.0, 1.0),
        "random": np.random.default_rng(0).random(60),
    }
    for name, start in starts.items():
        a, info = min_norm(M, warm=start)
        assert info.converged and info.gap <= DEFAULT_TOL, (name, info)
        assert_optimal(M, a.numpy(), float(best @ M @ best))
    # Near-duplicates: start on the wrong twin of every pair; the exchange must still finish.
    rng = np.random.default_rng(5)
    H = rng.standard_normal((80, 40))
    H = np.hstack([H, H + 1e-7 * rng.standard_normal(H.shape)])
    M2 = H.T @ H
    a, info = solve_min_norm(M2)
    wrong = np.concatenate([a[40:], a[:40]])
    b, info_b = solve_min_norm(M2, warm=wrong)
    assert info_b.converged and info_b.gap <= DEFAULT_TOL, info_b
    assert abs(float(b @ M2 @ b) - float(a @ M2 @ a)) <= 1e-9 * float(a @ M2 @ a)


def test_a_call_never_moves_the_state_and_advance_adopts_the_last_call() -> None:
    Gs = drift(conflicting_gradients(6, 20), 3, 1e-2, seed=3)
    Ms = [G.T @ G for G in Gs]
    b = MGDA()
    assert b.state_dict() == {}
    first = b(Ms[0])
    assert b.state_dict() == {} and torch.equal(b(Ms[0]).coefficients, first.coefficients)
    b(Ms[1])  # a step that is then skipped (not advanced) ...
    b(Ms[0])  # ... and the adopted one: advance takes the last call's solution
    b.advance()
    state = b.state_dict()
    np.testing.assert_array_equal(state["support"], np.flatnonzero(first.coefficients.numpy() > 0))
    np.testing.assert_allclose(state["weights"], first.coefficients.numpy()[state["support"]], rtol=0)
    b.advance()  # no call since: nothing to adopt
    assert b.state_dict() == state
    again = [b(Ms[2]).coefficients for _ in range(3)]
    assert all(torch.equal(c, again[0]) for c in again) and b.state_dict() == state


def test_adopt_takes_the_solution_of_the_adopted_output() -> None:
    """With `BalancerOutput.pending` (Balancer.adopt), the adopted output's own solution is taken;
    without it, adopt falls back to advance (the last call's)."""
    Gs = drift(conflicting_gradients(10, 15), 2, 0.5, seed=5)
    b = MGDA()
    outs = [b(G.T @ G) for G in Gs]
    b.adopt(outs[0])
    carries = "pending" in {f.name for f in fields(BalancerOutput)}
    c = outs[0 if carries else 1].coefficients.numpy()
    assert b.state_dict()["support"] == np.flatnonzero(c > 0).tolist()
    assert b.state_dict()["weights"] == c[c > 0].tolist()


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    Gs = drift(conflicting_gradients(7, 40), 6, 1e-2, seed=4)
    losses = torch.linspace(0.5, 2.0, 40)
    a, b = MGDA(normalization="loss+"), MGDA(normalization="loss+")
    for G in Gs[:3]:
        a(G.T @ G, losses)
        a.advance()
    buffer = io.BytesIO()
    torch.save({"balancer": a.state_dict()}, buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True)["balancer"])
    assert b.state_dict() == a.state_dict()
    for G in Gs[3:]:  # the restored balancer continues exactly as the original
        out_a, out_b = a(G.T @ G, losses), b(G.T @ G, losses)
        assert torch.equal(out_a.coefficients, out_b.coefficients) and out_a.info == out_b.info
        a.advance()
        b.advance()
    b.load_state_dict({})  # the empty state is a cold start again
    assert b.state_dict() == {} and b(Gs[0].T @ Gs[0], losses).info["solver_warm_start"] == 0.0


def test_zero_gradient_tasks_keep_their_place_in_the_warm_start() -> None:
    """Balancer.__call__ solves without zero-gradient tasks; the state stays indexed by all T tasks."""
    G = conflicting_gradients(8, 12)
    b = MGDA()
    b(G.T @ G)
    b.advance()
    H = G.copy()
    H[:, 4] = 0.0
    out = b(H.T @ H)
    assert out.info["solver_warm_start"] == 1.0 and out.coefficients[4] == 0.0
    b.advance()
    assert b.state_dict()["num_tasks"] == 12 and 4 not in b.state_dict()["support"]
    out = b(G.T @ G)
    assert out.info["solver_warm_start"] == 1.0
    ref = MGDA()(G.T @ G).coefficients.numpy()
    M = G.T @ G
    assert_optimal(M, out.coefficients.numpy(), float(ref @ M @ ref))


def good_state() -> dict:
    return {"num_tasks": 5, "support": [0, 2, 3], "weights": [0.5, 0.25, 0.25]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": 3}, "mgda state must be empty or have keys num_tasks, support, weights; got"),
        ({"num_tasks": True}, "num_tasks must be an integer >= 1; got True"),
        ({"num_tasks": 0}, "num_tasks must be an integer >= 1; got 0"),
        ({"num_tasks": 3}, r"support must be increasing task indices in \[0, 3\); got \[0, 2, 3\]"),
        ({"support": [0, 3, 2]}, "support must be increasing task indices"),
        ({"support": [0, 2, 2]}, "support must be increasing task indices"),
        ({"support": [-1, 2, 3]}, "support must be increasing task indices"),
        ({"support": []}, "support must be a non-empty list of task indices"),
        ({"support": [0.0, 2.0, 3.0]}, "support must be a non-empty list of task indices"),
        ({"support": "abc"}, "support must be a non-empty list of task indices"),
        ({"weights": [0.5, 0.5]}, r"weights must have one entry per support task \(3\)"),
        ({"weights": [1.0, 0.0, 0.0]}, "weights must be finite, > 0 and sum to 1"),
        ({"weights": [0.5, float("nan"), 0.5]}, "weights must be finite, > 0 and sum to 1"),
        ({"weights": [0.5, 0.5, 0.5]}, "weights must be finite, > 0 and sum to 1"),
        ({"weights": ["a", "b", "c"]}, "support and weights must be lists of numbers"),
    ],
)
def test_bad_states_are_value_errors_naming_the_problem(change: dict, message: str) -> None:
    state = {"step": 3} if "step" in change else {**good_state(), **change}
    with pytest.raises(ValueError, match=message):
        MGDA().load_state_dict(state)
    MGDA().load_state_dict(good_state())


def test_a_state_for_another_number_of_tasks_is_refused() -> None:
    b = MGDA()
    b.load_state_dict(good_state())
    G = conflicting_gradients(9, 7)
    with pytest.raises(ValueError, match=r"warm-start state is for 5 tasks; got a 7 x 7 Gramian"):
        b(G.T @ G)
    with pytest.raises(ValueError, match="mgda state is for 7 tasks; this balancer solves 5"):
        b.load_state_dict({"num_tasks": 7, "support": [1], "weights": [1.0]})
    with pytest.raises(ValueError, match="mgda state must be a dict; got list"):
        b.load_state_dict([1, 2])


def test_min_norm_checks_its_warm_start() -> None:
    M = np.eye(4)
    with pytest.raises(ValueError, match=r"warm must have shape \(4,\), one weight per task; got \(3,\)"):
        min_norm(M, warm=np.ones(3))
    for bad in (np.zeros(4), -np.ones(4), np.array([1.0, np.inf, 0.0, 0.0])):
        with pytest.raises(ValueError, match="warm must be finite weights >= 0 with a positive sum"):
            min_norm(M, warm=bad)
    np.testing.assert_allclose(min_norm(M, warm=torch.tensor([0.0, 0.0, 1.0, 0.0]))[0].numpy(), 0.25)
