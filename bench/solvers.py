"""Solve time and duality gap of every balancer on random Gramians, one thread, as a Markdown table.

Gramians come from low-rank-plus-noise gradients (P = 2T + 64, rank 8, a shared direction, 30% of the
tasks sign-flipped so that they conflict, norms near 1); the min-norm support holds ~80% of the tasks,
the hard case for an active-set solver. Each cell is the median wall time of one
balancer call (torch tensor in, coefficients out) over three Gramians and the worst relative duality
gap among them: min-norm's Frank-Wolfe gap for min_norm and mgda, step 3's gap for getmtl (its MGDA
solve has the mgda gap); mamg and uniform solve no optimisation problem. Calls repeat until a cell has
spent about 0.2 s, at least 3 and at most 200 times per Gramian, so mamg at T = 1000 (about 1 s a call:
its pairwise pass is O(T) per clip and these Gramians give ~4e5 clips) runs only 3 times per Gramian.

A second table times min_norm on near-duplicate tasks, the case the pairwise exchange finishes:
T = 300, 150 random gradients in R^P and copies of them perturbed by 1e-7 (three seeds per P),
with how many of the three solves converged.
Run: python3 bench/solvers.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dist_mtl.balancers import build_balancer, min_norm  # noqa: E402

SIZES = (2, 10, 40, 100, 1000)
SEEDS = (0, 1, 2)
COLUMNS = ("min_norm", "mgda", "getmtl", "mamg", "uniform")
CELL_SECONDS, MIN_CALLS, MAX_CALLS = 0.2, 3, 200
Solve = Callable[[torch.Tensor], float | None]  # one solve; returns its relative duality gap or None


def gramian(T: int, seed: int, rank: int = 8, noise: float = 0.5, conflict: float = 0.3) -> torch.Tensor:
    """M = G^T G for gradients sharing one direction, a rank-`rank` part and noise; some flipped."""
    rng = np.random.default_rng(seed)
    P = 2 * T + 64
    U = rng.standard_normal((P, rank)) / np.sqrt(P)
    G = 2.0 * U[:, :1] + U @ rng.standard_normal((rank, T)) + noise * rng.standard_normal((P, T)) / np.sqrt(P)
    G *= np.where(rng.random(T) < conflict, -1.0, 1.0) * 0.3
    return torch.from_numpy(G.T @ G)


def solvers() -> dict[str, Solve]:
    """Each column: a call that solves once and returns its relative duality gap (None: no problem)."""
    balancers = {name: build_balancer(name) for name in ("mgda", "getmtl", "mamg", "uniform")}

    def run(name: str, key: str | None) -> Solve:
        def call(M: torch.Tensor) -> float | None:
            info = balancers[name](M).info
            return info[key] if key else None

        return call

    return {
        "min_norm": lambda M: min_norm(M)[1].gap,
        "mgda": run("mgda", "solver_gap"),
        "getmtl": run("getmtl", "getmtl_gap"),
        "mamg": run("mamg", None),
        "uniform": run("uniform", None),
    }


def measure(call: Solve, grams: list[torch.Tensor]) -> tuple[float, float | None]:
    """Median seconds per call over all Gramians, and the worst gap."""
    times, gaps = [], []
    for M in grams:
        spent, calls = 0.0, 0
        while calls < MIN_CALLS or (spent < CELL_SECONDS / len(grams) and calls < MAX_CALLS):
            start = time.perf_counter()
            gap = call(M)
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            spent, calls = spent + elapsed, calls + 1
        if gap is not None:
            gaps.append(gap)
    return float(np.median(times)), (max(gaps) if gaps else None)


def cell(seconds: float, gap: float | None) -> str:
    ms = f"{seconds * 1e3:.3g} ms"
    return ms if gap is None else f"{ms}, gap {gap:.0e}"


def near_duplicates(P: int, seed: int, pairs: int = 150, delta: float = 1e-7) -> torch.Tensor:
    """M for 2 * pairs tasks: random gradients in R^P and copies of them perturbed by delta."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((P, pairs))
    G = np.hstack([G, G + delta * rng.standard_normal(G.shape)])
    return torch.from_numpy(G.T @ G)


def main() -> None:
    torch.set_num_threads(1)
    calls = solvers()
    print("| T | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---|" * len(COLUMNS), flush=True)
    with threadpool_limits(limits=1):
        for T in SIZES:
            grams = [gramian(T, seed) for seed in SEEDS]
            cells = [cell(*measure(calls[c], grams)) for c in COLUMNS]
            print(f"| {T} | " + " | ".join(cells) + " |", flush=True)
        print("\n| near-duplicates, T = 300 | min_norm | converged |")
        print("|---|---|---:|", flush=True)
        for P in (100, 200, 500):
            grams = [near_duplicates(P, seed) for seed in SEEDS]
            converged = sum(min_norm(M)[1].converged for M in grams)
            print(f"| P = {P} | {cell(*measure(calls['min_norm'], grams))} | {converged} of 3 |", flush=True)


if __name__ == "__main__":
    main()
