"""Per-step event counts in `Solution.events`: what the trainer sums into running totals."""

import numpy as np
import torch

from dist_mtl.balancers import build_balancer
from dist_mtl.solve import Solution, solve_on_host


def gramian(T: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((2 * T, 1)) + rng.standard_normal((2 * T, T)) * rng.uniform(0.3, 2.0, T)
    G *= np.where(rng.random(T) < 0.3, -1.0, 1.0)
    return torch.tensor(G.T @ G)


def test_mgda_counts_an_unconverged_solve() -> None:
    M, losses = gramian(), torch.ones(40)
    done = solve_on_host(build_balancer("mgda"), M, losses)
    assert done.events == {
        "unconverged_solves": 0,
        "degenerate_zero_norm": 0,
        "degenerate_pareto_stationary": 0,
        "degenerate_zero_gradient_tasks": 0,
    }
    capped = solve_on_host(build_balancer("mgda", max_iter=1), M, losses)
    assert capped.events["unconverged_solves"] == 1


def test_getmtl_counts_capped_steps_and_its_degenerate_branches() -> None:
    M = gramian(6, seed=1)
    g0_norm = float(M.sum()) ** 0.5 / 6
    eps = 0.025
    calm = solve_on_host(build_balancer("getmtl", eps=eps), M * (0.5 / (eps * g0_norm)) ** 2, torch.ones(6))
    keys = {"unconverged_solves", "getmtl_capped", "degenerate_zero_gw", "degenerate_no_scale"}
    keys.add("degenerate_zero_gradient_tasks")
    assert set(calm.events) == keys
    assert calm.events["unconverged_solves"] == calm.events["getmtl_capped"] == 0
    assert calm.events["degenerate_no_scale"] == 0
    past = solve_on_host(build_balancer("getmtl", eps=eps), M * (1.5 / (eps * g0_norm)) ** 2, torch.ones(6))
    assert past.events["getmtl_capped"] == 1 and past.events["degenerate_no_scale"] == 1
    unconverged = solve_on_host(build_balancer("getmtl", max_iter=1), gramian(), torch.ones(40))
    assert unconverged.events["unconverged_solves"] == 1


def test_balancers_without_solves_report_zero_and_skipped_steps_nothing() -> None:
    M = gramian(8)
    for name in ("uniform", "mamg"):
        events = solve_on_host(build_balancer(name), M, torch.ones(8)).events
        assert events == {"unconverged_solves": 0, "degenerate_zero_gradient_tasks": 0}
    M[0, 1] = float("nan")
    skipped = solve_on_host(build_balancer("mgda"), M, torch.ones(8))
    assert skipped.skipped and skipped.events == {}


def test_positional_construction_on_other_ranks_still_works() -> None:
    host = torch.arange(5, dtype=torch.float64)
    solution = Solution(host[:2], host[2:4], bool(host[4]), {})
    assert solution.events == {} and solution.gramian is None
