"""Solve time and accuracy of every balancer on random Gramians, one thread, as Markdown tables.

Gramians come from low-rank-plus-noise gradients (P = 2T + 64, rank 8, a shared direction, 30% of the
tasks sign-flipped so that they conflict, norms near 1); the min-norm support holds ~80% of the tasks,
the hard case for an active-set solver. Each cell is the median wall time of one
balancer call (torch tensor in, coefficients out) over three Gramians and the worst relative duality
gap among them: min-norm's Frank-Wolfe gap for min_norm and mgda, step 3's gap for getmtl (its MGDA
solve has the mgda gap); mamg and uniform solve no optimisation problem. Calls repeat until a cell has
spent about 0.2 s, at least 3 and at most 200 times per Gramian, so mamg at T = 1000 (about 1 s a call:
its pairwise pass is O(T) per clip and these Gramians give ~4e5 clips) runs only 3 times per Gramian.
These MGDA calls are cold: the bench never adopts a step, so the warm start never applies.

A second table times min_norm on near-duplicate tasks, the case the pairwise exchange finishes:
T = 300, 150 random gradients in R^P and copies of them perturbed by 1e-7 (three seeds per P),
with how many of the three solves converged.

A third table puts TorchJD's weightings (the installed version, see the JSON) beside ours on the same
Gramians: at T = 40 (three Gramians) and T = 1000 (one), the median time per call of each and the
ratio TorchJD / ours. Ours are found by their `name` among the Balancer subclasses of
dist_mtl/balancers/<module>.py, so a balancer that does not exist (or does not import) yet is reported
as missing and picked up once it does. Every measurement runs in a forked child with a time cap; a cap
hit reads "n/a (> X s)". Accuracy is TorchJD against ours, the worst over the Gramians: "coef" the
largest coefficient difference relative to TorchJD's largest coefficient, "dir" the difference of the
directions ||G (c_ours - c_torchjd)|| / ||G c_torchjd|| (M alone gives it), and where the method is an
optimisation or an equation, its own measure (see `OBJECTIVES`). Settings, TorchJD's defaults where
it has them:
- MGDA: epsilon 1e-3 and at most 100 Frank-Wolfe steps; a second row with epsilon 1e-10, 10^4 steps.
- UPGrad, DualProj: TorchJD's quadprog projector, whose default adds a ridge reg_eps = 1e-4 to the
  trace-normalised Gramian (another problem than the exact projection); a second row each without it.
- CAGrad c = 0.4; FairGrad alpha = 1.
- Nash-MTL: max_norm = 0 (no clipping), one update per step, at most 20 CCP steps; its cvxpy problem
  is built before the timed calls, and every timed call starts from its cold start alpha = 1.
- PCGrad: the random orders differ between the two, so its accuracy uses TorchJD's orders (the same
  torch seed) in our `pcgrad.project_coefficients`.

A fourth table is bench/warm_start.py's: MGDA warm-started from the previous step's support beside
cold solves on slowly changing Gramians.

Run: python3 bench/solvers.py [--quick] [--json FILE]
(--quick, a smoke run under 60 s: one seed, T up to 100, the TorchJD table at T = 40 only, two
warm-start rows; the full run takes about ten minutes on one core.)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/warm_start.py, however this is run

import warm_start  # noqa: E402

from dist_mtl.balancers import Balancer, build_balancer, min_norm  # noqa: E402

SIZES = (2, 10, 40, 100, 1000)
SEEDS = (0, 1, 2)
COLUMNS = ("min_norm", "mgda", "getmtl", "mamg", "uniform")
CELL_SECONDS, MIN_CALLS, MAX_CALLS = 0.2, 3, 200
Solve = Callable[[torch.Tensor], float | None]  # one solve; returns its relative duality gap or None


@dataclass(frozen=True)
class Settings:
    """What a run measures: the full run, or `--quick` (< 60 s)."""

    sizes: tuple[int, ...] = SIZES
    seeds: tuple[int, ...] = SEEDS
    dup_sizes: tuple[int, ...] = (100, 200, 500)
    cell_seconds: float = CELL_SECONDS
    min_calls: int = MIN_CALLS
    torchjd_seeds: dict[int, tuple[int, ...]] = field(default_factory=lambda: {40: SEEDS, 1000: (0,)})
    # seconds for all of one measurement (set-up and calls on every Gramian) at each T
    cap_torchjd: dict[int, float] = field(default_factory=lambda: {40: 60.0, 1000: 30.0})
    cap_ours: dict[int, float] = field(default_factory=lambda: {40: 60.0, 1000: 120.0})
    # calls at least per Gramian in the TorchJD table (ours: UPGrad at T = 1000 is ~40 s a call)
    torchjd_min_calls: dict[int, int] = field(default_factory=lambda: {40: MIN_CALLS, 1000: 1})


FULL = Settings()
QUICK = Settings(
    sizes=(2, 10, 40, 100),
    seeds=(0,),
    dup_sizes=(100,),
    cell_seconds=0.05,
    min_calls=1,
    torchjd_seeds={40: (0,)},  # T = 1000 only in the full run
    cap_torchjd={40: 10.0},
    cap_ours={40: 10.0},
    torchjd_min_calls={40: 1},
)


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


def measure(
    call: Solve, grams: list[torch.Tensor], cfg: Settings = FULL, max_calls: int = MAX_CALLS
) -> tuple[float, float | None]:
    """Median seconds per call over all Gramians, and the worst gap."""
    times, gaps = [], []
    for M in grams:
        spent, calls = 0.0, 0
        while calls < cfg.min_calls or (spent < cfg.cell_seconds / len(grams) and calls < max_calls):
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


def balancer_tables(cfg: Settings) -> dict[str, Any]:
    """The first two tables (printed as they go), as JSON rows."""
    calls = solvers()
    rows: dict[str, Any] = {"balancers": [], "near_duplicates": []}
    print("| T | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---|" * len(COLUMNS), flush=True)
    for T in cfg.sizes:
        grams = [gramian(T, seed) for seed in cfg.seeds]
        cells = []
        for c in COLUMNS:
            seconds, gap = measure(calls[c], grams, cfg)
            rows["balancers"].append({"T": T, "balancer": c, "seconds": seconds, "gap": gap})
            cells.append(cell(seconds, gap))
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)
    print("\n| near-duplicates, T = 300 | min_norm | converged |")
    print("|---|---|---:|", flush=True)
    for P in cfg.dup_sizes:
        grams = [near_duplicates(P, seed) for seed in cfg.seeds]
        converged = sum(min_norm(M)[1].converged for M in grams)
        seconds, gap = measure(calls["min_norm"], grams, cfg)
        rows["near_duplicates"].append({"P": P, "seconds": seconds, "gap": gap, "converged": converged})
        print(f"| P = {P} | {cell(seconds, gap)} | {converged} of {len(grams)} |", flush=True)
    return rows


# ---------------------------------------------------------------- TorchJD beside ours

Thunk = Callable[[], torch.Tensor]  # one call on a prepared Gramian; returns the coefficients
Prepare = Callable[[torch.Tensor], Thunk]  # untimed set-up for one Gramian


@dataclass(frozen=True)
class Pair:
    """One row: our balancer (module, `name`, options) and TorchJD's weighting for the same method."""

    label: str
    module: str
    name: str
    torchjd: Callable[[int], Prepare]  # T -> preparation of TorchJD's call
    options: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None  # a key of OBJECTIVES


def _gramian_weighting(
    factory: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[int], Prepare]:
    def for_size(T: int) -> Prepare:
        weighting = factory()
        return lambda M: lambda: weighting(M)

    return for_size


def _tj(name: str, **options: Any) -> Callable[[int], Prepare]:
    """TorchJD's `name` weighting (looked up when the row runs, so a missing one fails that row only)."""

    def factory() -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(importlib.import_module("torchjd.aggregation"), name)(**options)

    return _gramian_weighting(factory)


def _tj_exact_projection(name: str) -> Callable[[int], Prepare]:
    """UPGrad / DualProj with TorchJD's quadprog projector but no ridge (reg_eps = 0): its default adds
    1e-4 to the diagonal of the trace-normalised Gramian, a different problem from the exact projection."""

    def factory() -> Callable[[torch.Tensor], torch.Tensor]:
        projector = importlib.import_module("torchjd.linalg").QuadprogProjector(reg_eps=0.0)
        return getattr(importlib.import_module("torchjd.aggregation"), name)(projector=projector)

    return _gramian_weighting(factory)


def _tj_pcgrad(T: int) -> Prepare:
    """PCGradWeighting draws one torch.randperm per task; seeding before each call fixes the orders, so
    `pcgrad_orders` can hand the same ones to our projection code."""
    weighting = importlib.import_module("torchjd.aggregation").PCGradWeighting()

    def prepare(M: torch.Tensor) -> Thunk:
        def call() -> torch.Tensor:
            torch.manual_seed(PCGRAD_SEED)
            return weighting(M)

        return call

    return prepare


def _tj_nash(T: int) -> Prepare:
    """TorchJD's Nash-MTL weights a matrix J (rows the task gradients, GTG = J J^T), not a Gramian: J is
    M's symmetric-eigenvalue factor V sqrt(lambda). Built and called once untimed (its cvxpy problem);
    each timed call restarts from its cold start alpha = 1, as its first step does."""
    aggregation = importlib.import_module("torchjd.aggregation")

    def prepare(M: torch.Tensor) -> Thunk:
        lam, V = torch.linalg.eigh(M)
        J = V * lam.clamp(min=0.0).sqrt()
        weighting = aggregation.NashMTL(
            n_tasks=T, max_norm=0.0, update_weights_every=1, optim_niter=20
        ).weighting
        weighting(J)

        def call() -> torch.Tensor:
            weighting.prvs_alpha = np.ones(T, dtype=np.float32)
            return weighting(J)

        return call

    return prepare


PCGRAD_SEED = 0
PAIRS = (
    Pair("mgda", "mgda", "mgda", _tj("MGDAWeighting"), objective="min_norm"),
    Pair(
        "mgda (TorchJD 1e-10, 1e4 steps)",
        "mgda",
        "mgda",
        _tj("MGDAWeighting", epsilon=1e-10, max_iters=10_000),
        objective="min_norm",
    ),
    Pair("upgrad", "upgrad", "upgrad", _tj("UPGradWeighting"), objective="dual_cone"),
    Pair(
        "upgrad (TorchJD reg_eps 0)",
        "upgrad",
        "upgrad",
        _tj_exact_projection("UPGradWeighting"),
        objective="dual_cone",
    ),
    Pair("dualproj", "dualproj", "dualproj", _tj("DualProjWeighting"), objective="dual_cone"),
    Pair(
        "dualproj (TorchJD reg_eps 0)",
        "dualproj",
        "dualproj",
        _tj_exact_projection("DualProjWeighting"),
        objective="dual_cone",
    ),
    Pair("cagrad", "cagrad", "cagrad", _tj("CAGradWeighting", c=0.4), {"c": 0.4}, "cagrad"),
    Pair("imtl_g", "imtl_g", "imtl_g", _tj("IMTLGWeighting")),
    Pair("pcgrad", "pcgrad", "pcgrad", _tj_pcgrad),
    Pair("aligned_mtl", "aligned_mtl", "aligned_mtl", _tj("AlignedMTLWeighting")),
    Pair("fairgrad", "fairgrad", "fairgrad", _tj("FairGradWeighting", alpha=1.0), {"alpha": 1.0}, "power"),
    Pair("nash_mtl", "nash_mtl", "nash_mtl", _tj_nash, objective="power"),
)


def find_ours(pair: Pair) -> type[Balancer] | str:
    """Our class for `pair` (a Balancer subclass in its module whose `name` matches, ignoring '_'), or
    why there is none."""
    try:
        module = importlib.import_module(f"dist_mtl.balancers.{pair.module}")
    except Exception as err:  # a module being written may not import yet: report it, go on
        return f"not importable ({type(err).__name__}: {err})"
    want = pair.name.replace("_", "")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        name = getattr(cls, "name", None)
        if issubclass(cls, Balancer) and isinstance(name, str) and name.replace("_", "") == want:
            return cls
    return f"no Balancer named {pair.name!r} in dist_mtl.balancers.{pair.module}"


def build_ours(cls: type[Balancer], options: dict[str, Any]) -> Balancer:
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        options = {k: v for k, v in options.items() if k in names}
    return cls(**options)


def _ours(cls: type[Balancer], options: dict[str, Any]) -> Prepare:
    balancer = build_ours(cls, options)
    return lambda M: lambda: balancer(M).coefficients


def _run(prepare: Prepare, grams: list[torch.Tensor], cfg: Settings, conn: Any) -> None:
    """In the child: calls until the cell's time is spent (at least torchjd_min_calls per Gramian); sends the
    times and each Gramian's coefficients."""
    try:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        times, coefficients = [], []
        with threadpool_limits(limits=1):
            for M in grams:
                thunk = prepare(M)
                spent, calls = 0.0, 0
                least = cfg.torchjd_min_calls.get(M.shape[0], cfg.min_calls)
                while calls < least or (spent < cfg.cell_seconds / len(grams) and calls < MAX_CALLS):
                    start = time.perf_counter()
                    c = thunk()
                    elapsed = time.perf_counter() - start
                    times.append(elapsed)
                    spent, calls = spent + elapsed, calls + 1
                coefficients.append(np.asarray(c, dtype=np.float64))
        conn.send({"times": times, "coefficients": coefficients})
    except Exception as err:
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def capped(
    prepare: Callable[[], Prepare], grams: list[torch.Tensor], cfg: Settings, cap: float
) -> dict[str, Any]:
    """Measure in a forked child; {"timeout": cap} if it is not done within `cap` seconds."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            prep = prepare()
        except Exception as err:
            send.send({"error": f"{type(err).__name__}: {err}"})
            send.close()
            return
        _run(prep, grams, cfg, send)

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send.close()
    result: dict[str, Any] = {"timeout": cap}
    if receive.poll(cap):
        try:
            result = receive.recv()
        except EOFError:
            result = {"error": "the measuring process died"}
    if proc.is_alive():
        proc.terminate()  # the child this function started, by its own handle
    proc.join()
    return result


def _residual(M: np.ndarray, w: np.ndarray, p: float) -> float:
    """Backward error of M w = w^(-p): max_i |(M w)_i - w_i^-p| / ((|M| w)_i + w_i^-p); inf if w <= 0."""
    if not (w > 0).all():
        return float("inf")
    rhs = w ** (-p)
    return float(np.max(np.abs(M @ w - rhs) / (np.abs(M) @ w + rhs)))


def _cone(M: np.ndarray, c: np.ndarray) -> float:
    """Largest conflict of d = G c with a task, max_j max(0, -<g_j, d>) / (||g_j|| ||d||)."""
    norm = np.sqrt(max(float(c @ M @ c), 0.0))
    return float(np.max(np.maximum(-(M @ c), 0.0) / (np.sqrt(np.diag(M)) * norm + 1e-300)))


def _min_norm(M: np.ndarray, o: np.ndarray, t: np.ndarray) -> dict[str, float]:
    fo, ft = float(o @ M @ o), float(t @ M @ t)
    return {"torchjd_excess": (ft - fo) / fo}


def _cagrad(M: np.ndarray, o: np.ndarray, t: np.ndarray) -> dict[str, float]:
    vo, vt = float((M @ o).min()), float((M @ t).min())
    return {"ours_gain": (vo - vt) / abs(vo)}


# Each method's own measure: numbers per Gramian (the JSON keeps all; the table shows the largest).
OBJECTIVES: dict[str, tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]], str]] = {
    # MGDA: relative excess of TorchJD's a^T M a over ours (positive: ours is lower)
    "min_norm": (_min_norm, "f excess {torchjd_excess:+.0e}"),
    # UPGrad, DualProj: the result must conflict with no task (the dual cone); the largest conflict
    "dual_cone": (
        lambda M, o, t: {"ours_conflict": _cone(M, o), "torchjd_conflict": _cone(M, t)},
        "conflict ours {ours_conflict:.0e}, TorchJD {torchjd_conflict:.0e}",
    ),
    # CAGrad maximises min_i <g_i, d> over ||d - g0|| <= c ||g0||: ours minus TorchJD's, relative
    "cagrad": (_cagrad, "min_i <g_i,d> ours-TorchJD {ours_gain:+.0e}"),
    # FairGrad (alpha = 1) and Nash-MTL solve M w = 1 / w: the backward error of each
    "power": (
        lambda M, o, t: {"ours_residual": _residual(M, o, 1.0), "torchjd_residual": _residual(M, t, 1.0)},
        "residual ours {ours_residual:.0e}, TorchJD {torchjd_residual:.0e}",
    ),
}


def accuracy(pair: Pair, grams: list[torch.Tensor], ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict:
    """coef and dir differences and the method's own measure, worst over the Gramians (and all of them)."""
    coef, direction, measures = 0.0, 0.0, []
    for M_t, o, t in zip(grams, ours, theirs, strict=True):
        M = M_t.numpy()
        if pair.name == "pcgrad":
            o = pcgrad_with_torchjd_orders(M)
            if o is None:
                return {"coef": None, "dir": None, "objective": "no pcgrad.project_coefficients"}
        coef = max(coef, float(np.max(np.abs(o - t)) / max(np.max(np.abs(t)), 1e-300)))
        diff = o - t
        direction = max(direction, float(np.sqrt(max(diff @ M @ diff, 0.0) / max(t @ M @ t, 1e-300))))
        if pair.objective:
            measures.append(OBJECTIVES[pair.objective][0](M, o, t))
    out: dict[str, Any] = {"coef": coef, "dir": direction, "objective": None}
    if measures:
        worst = {k: max((m[k] for m in measures), key=abs) for k in measures[0]}
        out |= {"objective": OBJECTIVES[pair.objective][1].format(**worst), "measures": measures}
    return out


def pcgrad_with_torchjd_orders(M: np.ndarray) -> np.ndarray | None:
    """Our PCGrad projections with the orders TorchJD drew (one randperm per task, itself skipped)."""
    try:
        project = importlib.import_module("dist_mtl.balancers.pcgrad").project_coefficients
    except (ImportError, AttributeError):
        return None
    T = M.shape[0]
    torch.manual_seed(PCGRAD_SEED)
    orders = np.array([[j for j in torch.randperm(T).tolist() if j != i] for i in range(T)], dtype=np.intp)
    B = project(M, orders)[0]
    return B.sum(axis=0)


def _timing(result: dict[str, Any]) -> float | str:
    if "times" in result:
        return float(np.median(result["times"]))
    if "timeout" in result:
        return f"n/a (> {result['timeout']:g} s)"
    return f"error ({result['error']})"


def _ms(value: float | str | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if isinstance(value, float) else value


def torchjd_table(cfg: Settings) -> list[dict[str, Any]]:
    """Time and compare every pair (printed row by row); the rows as JSON."""
    sizes = tuple(cfg.torchjd_seeds)
    head = ["method"]
    for T in sizes:
        head += [f"ours T={T}", f"TorchJD T={T}", "TorchJD/ours"]
    head += ["coef diff", "dir diff", "objective / certificate"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (3 * len(sizes)) + "---:|---:|---|", flush=True)
    rows, measured = [], {}  # ours once per (class, options, T), whichever rows share it
    for pair in PAIRS:
        ours_cls = find_ours(pair)
        row: dict[str, Any] = {
            "method": pair.label,
            "ours": None if isinstance(ours_cls, str) else f"{ours_cls.__module__}.{ours_cls.__qualname__}",
            "sizes": {},
        }
        if isinstance(ours_cls, str):
            row["missing"] = ours_cls
        cells, acc_cells = [pair.label], {}
        for T in sizes:
            grams = [gramian(T, seed) for seed in cfg.torchjd_seeds[T]]
            theirs = capped(lambda T=T, pair=pair: pair.torchjd(T), grams, cfg, cfg.cap_torchjd[T])
            key = (ours_cls, tuple(sorted(pair.options.items())), T)
            if isinstance(ours_cls, str):
                ours: dict[str, Any] = {"error": "missing"}
            elif key in measured:
                ours = measured[key]
            else:
                ours = capped(
                    lambda cls=ours_cls, pair=pair: _ours(cls, pair.options), grams, cfg, cfg.cap_ours[T]
                )
                measured[key] = ours
            t_ours, t_theirs = _timing(ours), _timing(theirs)
            ratio = t_theirs / t_ours if isinstance(t_ours, float) and isinstance(t_theirs, float) else None
            entry = {"ours_seconds": t_ours, "torchjd_seconds": t_theirs, "ratio": ratio}
            if "coefficients" in ours and "coefficients" in theirs:
                entry |= accuracy(pair, grams, ours["coefficients"], theirs["coefficients"])
                acc_cells[T] = entry
            row["sizes"][str(T)] = entry
            ours_cell = "missing" if isinstance(ours_cls, str) else _ms(t_ours)
            cells += [ours_cell, _ms(t_theirs), f"{ratio:.3g}" if ratio else "-"]
        cells += _accuracy_cells(acc_cells)
        print("| " + " | ".join(cells) + " |", flush=True)
        rows.append(row)
    missing = [f"{r['method']}: {r['missing']}" for r in rows if "missing" in r]
    if missing:
        print("\nNot measured (ours): " + "; ".join(missing))
    return rows


def _accuracy_cells(acc: dict[int, dict[str, Any]]) -> list[str]:
    """One cell per measure; each size's value, labelled by T when there are several."""
    out = []
    for key, fmt in (("coef", "{:.0e}"), ("dir", "{:.0e}"), ("objective", "{}")):
        parts = [
            (f"T={T}: " if len(acc) > 1 else "") + (fmt.format(e[key]) if e[key] is not None else "-")
            for T, e in acc.items()
        ]
        out.append("; ".join(parts) if parts else "-")
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    try:
        out["torchjd"] = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        out["torchjd"] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, seeds and calls: under 60 s")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "threads": 1, "versions": versions()}
    with threadpool_limits(limits=1):
        results |= balancer_tables(cfg)
        print(f"\n| TorchJD {results['versions']['torchjd']} beside ours |")
        results["torchjd"] = torchjd_table(cfg)
        print()
        results["warm_start"] = warm_start.table(args.quick)
    results["seconds"] = time.perf_counter() - start
    print(f"\n(total {results['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
