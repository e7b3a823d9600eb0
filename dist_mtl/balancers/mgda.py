"""MGDA (Sener & Koltun 2018, seed 004): the min-norm element of the convex hull of the task gradients.

Optional gradient normalisation n_t before the solve, all computable from M and the losses:
none (the paper, n_t = 1), l2 (||g_t|| = sqrt(M_tt)), loss (L_t), loss+ (L_t ||g_t||). The solve runs
on the normalised Gramian M_n = D^-1 M D^-1 (D = diag(n)) and gives simplex weights a.

`apply="adopted"` (default) returns c_t = a_t / n_t, so d = sum_t a_t g_t / n_t is the min-norm
element of the normalised gradients. `apply="official"` returns c_t = a_t: the official code solves on
the normalised gradients but then scales the raw losses by a_t, which is neither the min-norm direction
of the raw nor of the normalised gradients when the n_t differ. It is offered to reproduce that code.
With normalization="none" the two coincide.

Each solve is warm-started from the last adopted step's solution (the balancer's only state,
checkpointed; see `MGDA`): on the slowly changing Gramians of training it needs a few affine solves
instead of rebuilding the support, and it ends on the same duality-gap test as a cold start.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from dist_mtl.balancers._arrays import ArrayLike
from dist_mtl.balancers.base import Balancer, BalancerOutput, solver_info
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, check_solver_options, solve_min_norm

# BalancerOutput.pending (the state `Balancer.adopt` moves to) where the base class has it.
_OUTPUT_CARRIES_PENDING = "pending" in {f.name for f in fields(BalancerOutput)}
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_MODES = ("adopted", "official")
# A normaliser below this fraction of the largest is clamped to it: a zero gradient (l2) stays zero
# after normalisation, and a zero or negative loss (loss, loss+) gets a long normalised gradient that
# the min-norm solve avoids, the limit of n_t -> 0, instead of a division by zero or a sign flip.
NORM_FLOOR = 1e-12


def gradient_normalizers(M: np.ndarray, losses: np.ndarray | None, kind: str) -> tuple[np.ndarray, int]:
    """The normalisers n_t for `kind` and how many were clamped to the floor."""
    norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
    if kind == "none":
        return np.ones(M.shape[0]), 0
    if kind == "l2":
        raw = norms
    elif kind == "loss":
        raw = np.asarray(losses, dtype=np.float64)
    else:
        raw = np.asarray(losses, dtype=np.float64) * norms
    top = float(raw.max())
    if not top > 0.0:
        return np.ones(M.shape[0]), M.shape[0]
    floor = NORM_FLOOR * top
    clamped = raw < floor
    return np.where(clamped, floor, raw), int(clamped.sum())


@dataclass
class MGDA(Balancer):
    """Min-norm weights on the (optionally normalised) Gramian; see the module doc for `apply`.

    Warm start: each solve starts from the support and weights of the last adopted step's solution
    (in the normalised problem, over all T tasks), so that on slowly changing Gramians the solver
    mostly re-solves one corral instead of rebuilding it vertex batch by vertex batch. A call never
    changes that state: it returns its solution as `pending` (and remembers it as a candidate), and
    `adopt(out)` (or `advance()`, which takes the last call's) makes it the next start once the caller
    adopts the step; a skipped step's solution is never taken. `state_dict` checkpoints the start.
    The answer does not depend on the start beyond the solver's tolerance: every solve ends on the
    same duality-gap test. MGDA-UB (representation gradients) is this class on another Gramian.
    """

    normalization: str = "none"
    apply: str = "adopted"
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    # The adopted start (float64 (T,) simplex weights) and the last call's solution, a candidate until
    # `advance()`; neither is an option nor part of equality.
    _warm: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _candidate: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _raw: ArrayLike | None = field(default=None, init=False, repr=False, compare=False)

    name = "mgda"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            valid = ", ".join(NORMALIZATIONS)
            raise ValueError(f"balancer.normalization must be one of {valid}; got {self.normalization!r}")
        if self.apply not in APPLY_MODES:
            raise ValueError(f"balancer.apply must be one of {', '.join(APPLY_MODES)}; got {self.apply!r}")
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    @property
    def needs_losses(self) -> bool:
        return self.normalization in ("loss", "loss+")

    def __call__(self, M: ArrayLike, losses: ArrayLike | None = None) -> BalancerOutput:
        """`Balancer.__call__`; `weights` reads the full M's diagonal to place a sub-problem's tasks."""
        self._raw = M if isinstance(M, torch.Tensor) else np.asarray(M)
        self._candidate = None
        try:
            out = super().__call__(M, losses)
        finally:
            self._raw = None
        if _OUTPUT_CARRIES_PENDING and self._candidate is not None:
            out = replace(out, pending=self._candidate)  # what `adopt(out)` takes
        return out

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        n, clamped = gradient_normalizers(M, losses, self.normalization)
        tasks = self._tasks(M.shape[0])
        warm = self._start(tasks)
        normalised = M if self.normalization == "none" else M / np.outer(n, n)  # n = 1: skip a T^2 pass
        a, solve = solve_min_norm(normalised, self.tol, self.max_iter, warm)
        if tasks is not None:
            self._candidate = np.zeros(self._num_tasks_called())
            self._candidate[tasks] = a
        coefficients = a / n if self.apply == "adopted" else a
        info = solver_info("solver", solve.iterations, solve.gap, solve.converged)
        # 1 when the solve started from the adopted support (T <= 2 and M = 0 need no solver at all)
        info["solver_warm_start"] = float(warm is not None and len(a) > 2 and solve.iterations > 0)
        info["degenerate_zero_norm"] = float(clamped)
        info["degenerate_pareto_stationary"] = float(solve.degenerate == "pareto_stationary")
        return coefficients, info

    def _num_tasks_called(self) -> int:
        return int(self._raw.shape[0]) if self._raw is not None else 0

    def _tasks(self, size: int) -> np.ndarray | None:
        """Positions among the call's T tasks of the T' solved here (Balancer.__call__ leaves the tasks
        with a zero diagonal out); None when called outside `__call__` or in a way this cannot tell."""
        if self._raw is None:
            return None
        T = self._num_tasks_called()
        if size == T:
            return np.arange(T)
        raw = self._raw
        diag = raw.diagonal().detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.diagonal(raw)
        active = np.flatnonzero(np.asarray(diag, dtype=np.float64) > 0.0)
        return active if len(active) == size else None

    def _start(self, tasks: np.ndarray | None) -> np.ndarray | None:
        """The adopted start restricted to this solve's tasks; None for a cold start (no state yet, or
        no weight left on these tasks). A state for another number of tasks is a ValueError."""
        if self._warm is None or tasks is None:
            return None
        T = self._num_tasks_called()
        if len(self._warm) != T:
            raise ValueError(
                f"mgda warm-start state is for {len(self._warm)} tasks; got a {T} x {T} Gramian "
                "(a checkpoint of another problem?)"
            )
        warm = self._warm[tasks]
        return warm if warm.sum() > 0.0 else None

    def adopt(self, out: BalancerOutput) -> None:
        """The solution behind `out` (its `pending`, when the output carries one) becomes the next start."""
        pending = getattr(out, "pending", None)
        if pending is None:
            self.advance()
        else:
            self._warm, self._candidate = pending, None

    def advance(self) -> None:
        """The last call's solution becomes the next call's start (a skipped step's call is discarded)."""
        if self._candidate is not None:
            self._warm, self._candidate = self._candidate, None

    def state_dict(self) -> dict[str, Any]:
        """{} before the first adopted step, else the start: num_tasks, support (task indices, increasing)
        and weights (on the support, summing to 1), as plain lists for `torch.load(weights_only=True)`."""
        if self._warm is None:
            return {}
        support = np.flatnonzero(self._warm > 0.0)
        return {
            "num_tasks": len(self._warm),
            "support": support.tolist(),
            "weights": self._warm[support].tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output ({} clears the start); anything else is a ValueError naming what
        is wrong, as is a state for another number of tasks than this balancer already solves."""
        if not isinstance(state, dict):
            raise ValueError(f"mgda state must be a dict; got {type(state).__name__}")
        solved = None if self._warm is None else len(self._warm)
        self._warm, self._candidate = _warm_from_state(state, solved), None


def _warm_from_state(state: dict[str, Any], expected: int | None) -> np.ndarray | None:
    if not state:
        return None
    keys = ("num_tasks", "support", "weights")
    if set(state) != set(keys):
        raise ValueError(f"mgda state must be empty or have keys {', '.join(keys)}; got {sorted(state)}")
    num_tasks = state["num_tasks"]
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int | np.integer) or num_tasks < 1:
        raise ValueError(f"mgda state num_tasks must be an integer >= 1; got {num_tasks!r}")
    if expected is not None and num_tasks != expected:
        raise ValueError(f"mgda state is for {num_tasks} tasks; this balancer solves {expected}")
    try:
        support = np.asarray(state["support"])
        weights = np.asarray(state["weights"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"mgda state support and weights must be lists of numbers: {err}") from None
    if support.ndim != 1 or not len(support) or not np.issubdtype(support.dtype, np.integer):
        got = state["support"]
        raise ValueError(f"mgda state support must be a non-empty list of task indices; got {got!r}")
    if support.min() < 0 or support.max() >= num_tasks or np.any(np.diff(support) <= 0):
        raise ValueError(
            f"mgda state support must be increasing task indices in [0, {num_tasks}); got {support.tolist()}"
        )
    if weights.shape != support.shape:
        raise ValueError(
            f"mgda state weights must have one entry per support task ({len(support)}); got {weights.shape}"
        )
    if not np.isfinite(weights).all() or weights.min() <= 0.0 or abs(weights.sum() - 1.0) > 1e-6:
        raise ValueError(f"mgda state weights must be finite, > 0 and sum to 1; got {weights.tolist()}")
    warm = np.zeros(int(num_tasks))
    warm[support] = weights  # as saved: the solver renormalises its start, and a round trip is exact
    return warm
