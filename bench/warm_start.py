"""MGDA warm-started from the previous step's support beside cold solves, on slowly changing Gramians.

A training run hands MGDA one Gramian per step, each close to the last. This replays such sequences:
G_{k+1} = G_k + sigma * (mean column norm / sqrt(P)) * N(0, 1) noise, M_k = G_k^T G_k, starting from
bench/solvers.py's hard gradients (low rank plus noise, 30% of the tasks flipped: ~80% of the tasks in
the min-norm support), and at T = 300 from near-duplicate pairs (150 gradients in R^200 and copies
perturbed by 1e-7, the case the pairwise exchange finishes; both twins drift alike, so the pairs stay
1e-7 apart). For every step both solve the same M, interleaved:
"cold" is a fresh MGDA (what every step cost before), "warm" the same MGDA instance adopting each
step's solution (`MGDA.adopt`), as training does. Per row: mean affine solves (the solver's unit of
work), median time per call (best of `repeat` calls per step), the speed-up, and the agreement: the
largest relative difference of the objective a^T M a between warm and cold and the largest relative
duality gap of the warm solves (the certificate both end on). The first step (no state yet) is left
out of the statistics.

Run: python3 bench/warm_start.py [--quick] [--json FILE]   (bench/solvers.py runs it too)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dist_mtl.balancers import MGDA  # noqa: E402

# (start, T, sigma, steps, repeat); start is "conflicts" (bench/solvers.py's) or "twins" (near-duplicates)
FULL = [
    ("conflicts", 40, 1e-3, 30, 5),
    ("conflicts", 40, 1e-2, 30, 5),
    ("conflicts", 40, 1e-1, 30, 5),
    ("conflicts", 1000, 1e-3, 8, 1),
    ("conflicts", 1000, 1e-2, 8, 1),
    ("conflicts", 1000, 1e-1, 8, 1),
    ("twins", 300, 1e-3, 8, 3),
    ("twins", 300, 1e-2, 8, 3),
]
QUICK = [("conflicts", 40, 1e-2, 12, 3), ("conflicts", 1000, 1e-2, 3, 1)]
COLUMNS = (
    "start",
    "T",
    "sigma",
    "steps",
    "cold iters",
    "warm iters",
    "cold",
    "warm",
    "speed-up",
    "agreement",
)


def conflicting_gradients(
    T: int, seed: int, rank: int = 8, noise: float = 0.5, conflict: float = 0.3
) -> np.ndarray:
    """P x T gradients sharing one direction, a rank-`rank` part and noise; some flipped (P = 2T + 64)."""
    rng = np.random.default_rng(seed)
    P = 2 * T + 64
    U = rng.standard_normal((P, rank)) / np.sqrt(P)
    G = 2.0 * U[:, :1] + U @ rng.standard_normal((rank, T)) + noise * rng.standard_normal((P, T)) / np.sqrt(P)
    return G * np.where(rng.random(T) < conflict, -1.0, 1.0) * 0.3


def gramians(start: str, T: int, sigma: float, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Gramians of consecutive steps; near-duplicate pairs drift together (both twins get the same
    change), so that every step keeps pairs 1e-7 apart, the case the pairwise exchange finishes."""
    rng = np.random.default_rng(seed + 1)
    if start == "conflicts":
        G, twins = conflicting_gradients(T, seed), None
    else:
        G = np.random.default_rng(seed).standard_normal((200, T // 2))
        twins = 1e-7 * np.random.default_rng(seed + 2).standard_normal(G.shape)
    for _ in range(steps):
        full = G if twins is None else np.hstack([G, G + twins])
        yield torch.from_numpy(full.T @ full)
        G = G + sigma * np.linalg.norm(G, axis=0).mean() / np.sqrt(G.shape[0]) * rng.standard_normal(G.shape)


def timed(balancer: MGDA, M: torch.Tensor, repeat: int) -> tuple[Any, float]:
    best, out = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = balancer(M)
        best = min(best, time.perf_counter() - start)
    return out, best


def row(start: str, T: int, sigma: float, steps: int, repeat: int) -> dict[str, Any]:
    warm = MGDA()
    stats: dict[str, list[float]] = {
        k: [] for k in ("cold_iters", "warm_iters", "cold_s", "warm_s", "diff", "gap")
    }
    for k, M in enumerate(gramians(start, T, sigma, steps)):
        cold_out, cold_s = timed(MGDA(), M, repeat)
        warm_out, warm_s = timed(warm, M, repeat)
        warm.adopt(warm_out)
        if k == 0:
            continue
        a, b = cold_out.coefficients, warm_out.coefficients
        fa, fb = float(a @ M @ a), float(b @ M @ b)
        stats["cold_iters"].append(cold_out.info["solver_iterations"])
        stats["warm_iters"].append(warm_out.info["solver_iterations"])
        stats["cold_s"].append(cold_s)
        stats["warm_s"].append(warm_s)
        stats["diff"].append(abs(fb - fa) / max(fa, np.finfo(np.float64).tiny))
        stats["gap"].append(warm_out.info["solver_gap"])
    cold_s, warm_s = float(np.median(stats["cold_s"])), float(np.median(stats["warm_s"]))
    return {
        "start": start,
        "T": T,
        "sigma": sigma,
        "steps": steps,
        "cold_iterations": float(np.mean(stats["cold_iters"])),
        "warm_iterations": float(np.mean(stats["warm_iters"])),
        "cold_seconds": cold_s,
        "warm_seconds": warm_s,
        "speedup": cold_s / warm_s,
        "max_objective_rel_diff": float(max(stats["diff"])),
        "max_warm_gap": float(max(stats["gap"])),
    }


def markdown(r: dict[str, Any]) -> str:
    cells = [
        r["start"],
        str(r["T"]),
        f"{r['sigma']:g}",
        str(r["steps"]),
        f"{r['cold_iterations']:.1f}",
        f"{r['warm_iterations']:.1f}",
        f"{r['cold_seconds'] * 1e3:.3g} ms",
        f"{r['warm_seconds'] * 1e3:.3g} ms",
        f"{r['speedup']:.1f}x",
        f"f diff {r['max_objective_rel_diff']:.0e}, gap {r['max_warm_gap']:.0e}",
    ]
    return "| " + " | ".join(cells) + " |"


def table(quick: bool = False) -> list[dict[str, Any]]:
    """Run the rows (printing each as it finishes) and return them."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * (len(COLUMNS) - 2) + "---|", flush=True)
    rows = []
    with threadpool_limits(limits=1):
        for spec in QUICK if quick else FULL:
            rows.append(row(*spec))
            print(markdown(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short rows (a few seconds)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = table(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"warm_start": rows}, f, indent=2)


if __name__ == "__main__":
    main()
