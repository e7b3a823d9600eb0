"""Projections onto the dual cone of the task gradients, many at once, on the Gramian alone.

The dual cone of G = [g_1 ... g_T] is C = {x : G^T x >= 0}, the directions that conflict with no task.
The projection of G u onto C is G w with w = argmin_{v >= u} v^T M v (Quinton & Rey 2024, Prop. 1;
by Moreau, G u - pi_C(G u) is the projection of G u onto the polar cone -cone(G)). With w = u + lam it
is non-negative least squares in Gramian form, min_{lam >= 0} ||G lam + G u||^2, whose KKT conditions
are lam >= 0, y = M w >= 0 and lam_j y_j = 0; lam^T y is the duality gap of the QP.

Solver: active sets on lam, B problems in lockstep. Each problem keeps a passive set P (the
constraints let go, lam_P > 0); an iteration solves M_PP z_P = -(M u)_P for every problem still running
(small blocks batched, see below; blocks of 96 and more one problem at a time, each M_PP gathered
unpadded and factored by LAPACK dposv, Cholesky: half the flops of an LU; the Lawson-Hanson fallback
in batched LUs on blocks padded with identity, sorted by size, 32 MiB each).
First primal-dual active set rounds (Hintermueller, Ito & Kunisch 2002), started from the constraints
violated at lam = 0: P <- {j in P : z_j > 0} + {j not in P : y_j violated}; a round that leaves P as it
is ends at a certified KKT point, usually after 4 to 7 rounds. A problem still changing after 15
rounds (PDAS can cycle on a general PSD M) restarts in Lawson & Hanson's (1974) NNLS from lam = 0,
which terminates: a solution with a non-positive entry is met by the step back to the boundary,
dropping the blocking indices; a positive one becomes the iterate, and violated constraints enter P
all at once, falling back to one most-violated index at a time for a problem whose objective did not
decrease after such an entry (the textbook rule, which always makes progress).

Small blocks (|P| < 96, the whole batch in one 32 MiB chunk: UPGrad up to T ~ 100) take a leaner
primal-dual round, since there a round's cost is NumPy's per-call and indexing overhead and the LU's
small-matrix inefficiency, not flops: each problem's P, sorted ascending and padded with distinct dummy
indices T + j, is gathered by one flat `take` from M bordered by an identity (the same padded blocks
as the masks build), factored by one batched Cholesky (NumPy) and solved by two batched triangular
solves (torch's, on the same memory; NumPy has none); an LU where a block is not numerically positive
definite. Problems are split into two chunks by |P| only where that saves more Cholesky work than a
chunk's calls cost. Once at most 8 problems are left, each finishes its rounds alone on index arrays
(LAPACK dposv): a batched round costs about the same with 8 problems as with 40. At T = 40 on
strongly conflicting Gramians this takes UPGrad from about 2.1 ms to 1.4 ms (one core).
Tried and dropped: warm-starting a problem from a similar task's final P (no fewer rounds: the sets
differ by about 10 indices), starting from the DualProj answer's P, and a few accelerated projected
gradient steps before the rounds (cond(M) ~ 3e3 here: 100 steps to guess P well).

One problem alone (DualProj) takes `project_one`: the same rounds, stopping rule and fallback, on
index arrays instead of batched masks, since at small T a round's cost is NumPy's per-call overhead.

Stopping rule, with M scaled to unit largest diagonal, n_j = ||g_j|| and s_b = ||G u_b||: problem b
is done when every y_j >= -(tol n_j s_b + noise_j), noise_j = 8 T eps n_j sum_k |w_k| n_k being the
rounding bound of the computed y_j (y_P = 0 holds to rounding by construction). The diagnostics are
the largest relative violation max_j -y_j / (n_j s_b) and the largest relative gap
sum_j lam_j |y_j| / s_b^2.
A relative ridge, M_jj T eps added to each diagonal entry of M_PP, keeps near-duplicate tasks in P
solvable; it perturbs lam at rounding level where M_PP is well conditioned, and the KKT check above
still certifies the answer.

Cost: a round is sum_b |P_b|^3 / 3 flops (Cholesky) or 2/3 |P_b|^3 (LU). UPGrad (B = T) on strongly
conflicting Gramians has |P_b| near 0.45 T, so T = 1000 costs about 7 rounds of 3e10 flops (about 12 s
on one core; 16 s when the blocks were built padded with masks), while T = 40 is a few batched
20 x 20 solves. Reusing one factor per problem across
rounds (bordered Schur complements) was tried and lost: P moves by about half its size between the
first rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from numpy.linalg import LinAlgError
from scipy.linalg import cho_factor, cho_solve
from scipy.linalg.lapack import dposv

from dist_mtl.balancers.base import solver_info
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, EPS, check_solver_options

_CHOLESKY_FROM = 96  # blocks from this size on are solved one by one by Cholesky
_CHUNK_ENTRIES = 1 << 22  # padded (chunk, K, K) blocks per batched LU: 32 MiB of float64
_PDAS_ROUNDS = 15  # primal-dual active set rounds before a problem falls back to Lawson-Hanson
_SPLIT_COST = 400_000.0  # what a second chunk costs in calls, in units of K^3 of Cholesky work (~40 us)
_TAIL = 8  # problems left from which `_primal_dual` goes on one problem at a time


@dataclass(frozen=True)
class DualConeInfo:
    """Diagnostics of one batched solve: `iterations` counts batched solves (each costs one LU of all
    problems still running); `gap` and `violation` are the worst over the problems (see module doc)."""

    iterations: int
    gap: float
    violation: float
    converged: bool
    unconverged: int


def regularized_gramian(M: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """TorchJD's normalize-then-regularize: M / tr(M) (0 when tr(M) < norm_eps) + reg_eps I; M if both 0."""
    if norm_eps == 0.0 and reg_eps == 0.0:
        return M
    trace = float(np.trace(M))
    scaled = M / trace if trace >= norm_eps and trace > 0.0 else np.zeros_like(M)
    return scaled + reg_eps * np.eye(M.shape[0])


@dataclass(frozen=True)
class DualConeOptions:
    """The options UPGrad and DualProj share (list it before the Balancer base): TorchJD's
    regularisation (`regularized_gramian`) and the solve's tolerance and round cap."""

    norm_eps: float = 0.0
    reg_eps: float = 0.0
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        check_regularization(self.norm_eps, self.reg_eps)
        check_solver_options(self.tol, self.max_iter, prefix="balancer.")

    def gramian(self, M: np.ndarray) -> np.ndarray:
        return regularized_gramian(M, self.norm_eps, self.reg_eps)


def check_regularization(norm_eps: float, reg_eps: float) -> None:
    for field, value in (("norm_eps", norm_eps), ("reg_eps", reg_eps)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < np.inf:
            raise ValueError(f"balancer.{field} must be a finite number >= 0; got {value!r}")


def dual_cone_info(solve: DualConeInfo) -> dict[str, float]:
    """Diagnostics: `solver_*` as MGDA logs them, the worst KKT violation, the unconverged projections."""
    info = solver_info("solver", solve.iterations, solve.gap, solve.converged)
    info |= {"solver_violation": solve.violation, "solver_unconverged_projections": float(solve.unconverged)}
    return info


def project_dual_cone(
    M: np.ndarray, U: np.ndarray, tol: float, max_iter: int
) -> tuple[np.ndarray, DualConeInfo]:
    """W with row b = argmin_{v >= U_b} v^T M v for a PSD Gramian M (T, T) and bounds U (B, T).

    G W_b is the projection of G U_b onto the dual cone of the columns of G. A problem still running
    after `max_iter` batched solves returns its last iterate, which is feasible (W_b >= U_b) and, being
    the minimiser on its passive set, never worse than G U_b itself; `converged` is then False.
    """
    B, T = U.shape
    norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
    top = float(norms.max())
    if top == 0.0:
        return U.copy(), DualConeInfo(0, 0.0, 0.0, True, 0)
    Mn, n = M / top**2, norms / top
    Y0 = U @ Mn  # y at lam = 0; its row b is (M u_b)
    s = np.sqrt(np.clip(np.einsum("bt,bt->b", U, Y0), 0.0, None))
    lam = np.zeros((B, T))
    passive = np.zeros((B, T), dtype=bool)
    todo, iterations = _primal_dual(U, Mn, Y0, n, s, tol, lam, passive, min(max_iter, _PDAS_ROUNDS))
    lam[todo], passive[todo] = 0.0, False  # a problem that cycled restarts in Lawson-Hanson from 0
    single = np.zeros(B, dtype=bool)  # fall back to one index per entry (Lawson-Hanson's rule)
    f_prev = np.full(B, np.inf)
    todo = _enter(todo, U, lam, passive, Y0, Mn, n, s, tol, single, f_prev)
    while len(todo) and iterations < max_iter:
        iterations += 1
        z = _solve_passive(Mn, Y0[todo], passive[todo])
        lt, pt = lam[todo], passive[todo]
        bad = pt & (z <= 0.0)
        blocked = bad.any(axis=1)
        # On bad entries lt - z >= lt >= 0, so the ratio is in [0, 1]; 0 / 0 (lt = z = 0) blocks at 0.
        denominator = np.maximum(lt - z, np.finfo(np.float64).tiny)
        ratio = np.divide(lt, denominator, out=np.full(lt.shape, np.inf), where=bad)
        alpha = np.where(blocked, ratio.min(axis=1), 1.0)
        new = lt + alpha[:, None] * (z - lt)
        drop = bad & (ratio <= alpha[:, None])
        new[drop | ~pt] = 0.0
        np.maximum(new, 0.0, out=new)
        lam[todo], passive[todo] = new, pt & ~drop
        settled = todo[~blocked]
        todo = np.concatenate(
            [todo[blocked], _enter(settled, U, lam, passive, Y0, Mn, n, s, tol, single, f_prev)]
        )
    W = U + lam
    Y = W @ Mn
    violation = np.max(-Y / np.maximum(np.outer(s, n), EPS), axis=1, initial=0.0).clip(0.0)
    gap = np.einsum("bt,bt->b", lam, np.abs(Y)) / np.maximum(s**2, EPS)
    info = DualConeInfo(iterations, float(gap.max()), float(violation.max()), not len(todo), len(todo))
    return W, info


def project_one(M: np.ndarray, u: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, DualConeInfo]:
    """`project_dual_cone` for one problem (B = 1, DualProj): argmin_{v >= u} v^T M v, the same rounds,
    stopping rule and diagnostics, without the batching.

    At T = 40 the work is a few 15 x 15 solves and the cost is NumPy's per-call overhead, so a round
    here is a dozen calls on the passive set's indices (about 6 us at T = 40, where the batched code's
    sorts, padding and masks cost several times that): a gather of P's rows of the ridged M, a Cholesky
    solve (LAPACK dposv), y off P from those rows, the next P; 4 to 6 rounds on conflicting Gramians at
    T = 40. A problem that comes back to a passive set it had (a cycle) or still changes after
    _PDAS_ROUNDS rounds, or a block that is not numerically positive definite, goes to
    `project_dual_cone` (its Lawson-Hanson fallback and LU solves), which restarts it from scratch. The
    threshold is fixed at w = u (see below).
    """
    T = u.shape[0]
    d = M.diagonal()
    top = float(d.max())
    if not top > 0.0:
        return u.copy(), DualConeInfo(0, 0.0, 0.0, True, 0)
    scale = 1.0 / top
    Mr = M * scale  # M scaled to unit largest diagonal, with the relative ridge T eps M_jj on its diagonal
    Mr.ravel()[:: T + 1] *= 1.0 + T * EPS
    n = np.sqrt(np.maximum(d * scale, 0.0))
    y0 = M @ u
    y0 *= scale
    minus_y0 = -y0
    s = math.sqrt(max(float(u.dot(y0)), 0.0))
    # `_threshold` at w = u for every round: tol n_j s + 8 T eps n_j sum_k |u_k| n_k, computed once. Where
    # |w| >= |u| (DualProj: u > 0 and z >= 0 at the end) it is at least as strict as the rule at w, so a
    # point it accepts is certified; a cycle it could cause at rounding level goes to the general solver.
    threshold = -(tol * s + 8.0 * T * EPS * float(np.abs(u).dot(n))) * n
    start = passive = y0 < threshold
    seen = {passive.tobytes()}
    lam, used, rounds = None, 0, min(max_iter, _PDAS_ROUNDS)
    while used < rounds:
        used += 1
        idx = passive.nonzero()[0]
        k = idx.size
        if not k:  # z = 0: none violated at the start (the solution), or back to the start (a cycle)
            if passive is start:
                lam = np.zeros(T)
            break
        rows = Mr.take(idx, axis=0)
        # the block is symmetric: its transpose is the Fortran-ordered array LAPACK takes without a copy;
        # positional (lower, overwrite_a, overwrite_b): f2py parses keywords slowly
        _, sol, info = dposv(rows.take(idx, axis=1).T, minus_y0.take(idx), 1, 1, 1)
        if info != 0:  # not positive definite to working precision: the general solver
            break
        y = np.dot(sol, rows)  # off P (all that is read of y here) the ridge does not enter
        y += y0
        nxt = y < threshold
        nxt[idx] = sol > 0.0
        key = nxt.tobytes()
        if key == passive.tobytes():  # P unchanged: a certified KKT point, lam_P = z_P > 0
            lam = np.zeros(T)
            lam[idx] = sol
            break
        if key in seen:  # a cycle (PDAS can cycle on a general PSD M): the general solver
            break
        seen.add(key)
        passive = nxt
    converged = lam is not None
    if not converged:
        if used < max_iter:  # a cycle, _PDAS_ROUNDS rounds, or a block that is not positive definite
            W, solve = project_dual_cone(M, u[None, :], tol, max_iter - used)
            return W[0], replace(solve, iterations=solve.iterations + used)
        lam = np.zeros(T)  # out of iterations: the start, feasible, as `project_dual_cone` returns it
    w = u + lam
    y = M @ w
    y *= scale
    violation = max(-float((y / np.maximum(s * n, EPS)).min()), 0.0)
    gap = float(lam.dot(np.abs(y))) / max(s * s, EPS)
    return w, DualConeInfo(used, gap, violation, converged, int(not converged))


def _threshold(W: np.ndarray, n: np.ndarray, s: np.ndarray, tol: float) -> np.ndarray:
    """How negative y_j = (M w)_j may be for problem b: tol n_j s_b plus the rounding bound of y_j."""
    noise = 8.0 * len(n) * EPS * (np.abs(W) @ n)
    return (tol * s + noise)[:, None] * n[None, :]


def _primal_dual(
    U: np.ndarray,
    Mn: np.ndarray,
    Y0: np.ndarray,
    n: np.ndarray,
    s: np.ndarray,
    tol: float,
    lam: np.ndarray,
    passive: np.ndarray,
    rounds: int,
) -> tuple[np.ndarray, int]:
    """Primal-dual active set rounds: P <- {j in P: z_j > 0} + {j not in P: y_j < -threshold}.

    A round whose P does not change has z >= 0 and y >= -threshold: the KKT point, certified. Writes
    the solved problems' lam and the running problems' P; returns the problems still running and the
    rounds used.
    """
    B, T = Y0.shape
    todo = np.arange(B)
    passive[:] = -_threshold(U, n, s, tol) > Y0  # the start: every constraint violated at lam = 0
    pt, y0, u, st = passive.copy(), Y0, U, s  # the running problems' rows, compacted as problems finish
    # Mn ridged, and (for `_solve_gathered`) bordered by an identity with rhs = -(M u) bordered by zeros,
    # built when first used (rhs is (B, 2T): only for the small blocks)
    ridged = gather = rhs = None
    used = 0
    while len(todo) and used < rounds:
        if len(todo) <= _TAIL:  # a few problems left: per-problem rounds cost less than batched ones
            ridged = _ridged(Mn) if ridged is None else ridged
            still, most = [], 0
            for j, b in enumerate(todo):
                z, spent = _primal_dual_one(ridged, y0[j], u[j], st[j], n, tol, pt[j], rounds - used)
                most = max(most, spent)
                if z is None:
                    still.append(j)
                else:
                    lam[b] = np.maximum(z, 0.0)
            todo, pt, used = todo[still], pt[still], used + most
            break
        used += 1
        sizes = np.count_nonzero(pt, axis=1)
        K = int(sizes.max())
        if K < _CHOLESKY_FROM and len(todo) * K * K <= _CHUNK_ENTRIES:
            if gather is None:
                ridged = _ridged(Mn) if ridged is None else ridged
                gather = _bordered(ridged)
            if rhs is None:
                rhs = np.zeros((len(todo), 2 * T))
                np.negative(y0, out=rhs[:, :T])
            z = _solve_gathered(gather, rhs, pt, sizes)
        else:
            ridged = _ridged(Mn) if ridged is None else ridged
            z = _solve_each(ridged, y0, pt)
        Y = z @ Mn
        Y += y0
        # y_j < -threshold (`_threshold` at w = u + z), P's entries replaced by z_P > 0
        nxt = np.where(
            pt, z > 0.0, np.multiply.outer(-(tol * st + 8.0 * T * EPS * (np.abs(u + z) @ n)), n) > Y
        )
        going = (nxt != pt).any(axis=1)
        if going.all():
            pt = nxt
            continue
        done = ~going
        lam[todo[done]] = np.maximum(z[done], 0.0)  # (a finished problem's P is not read again)
        todo, pt, y0, u, st = todo[going], nxt[going], y0[going], u[going], st[going]
        rhs = None if rhs is None else rhs[going]
    passive[todo] = pt
    return todo, used


def _primal_dual_one(
    ridged: np.ndarray,
    y0: np.ndarray,
    u: np.ndarray,
    s: float,
    n: np.ndarray,
    tol: float,
    passive: np.ndarray,
    rounds: int,
) -> tuple[np.ndarray | None, int]:
    """`_primal_dual`'s rounds for one problem from its passive set, on index arrays (LAPACK dposv on the
    gathered block, an LU where it is not numerically positive definite): z at the certified KKT point,
    or None if P still changes after `rounds` rounds; and the rounds used."""
    T = y0.shape[0]
    minus = -y0
    noise = 8.0 * T * EPS
    for used in range(1, rounds + 1):
        idx = passive.nonzero()[0]
        z, y = np.zeros(T), y0
        if idx.size:
            rows = ridged.take(idx, axis=0)
            _, sol, info = dposv(rows.take(idx, axis=1).T, minus.take(idx), 1, 1, 1)
            if info != 0:
                sol = np.linalg.solve(rows.take(idx, axis=1), minus.take(idx))
            z[idx] = sol
            y = np.dot(sol, rows)  # off P (all that is read of y) the ridge does not enter
            y += y0
        w = u + z
        nxt = y < -(tol * s + noise * float(np.abs(w).dot(n))) * n
        nxt[idx] = z[idx] > 0.0
        if np.array_equal(nxt, passive):
            return z, used
        passive = nxt
    return None, rounds


def _enter(
    probs: np.ndarray,
    U: np.ndarray,
    lam: np.ndarray,
    passive: np.ndarray,
    Y0: np.ndarray,
    Mn: np.ndarray,
    n: np.ndarray,
    s: np.ndarray,
    tol: float,
    single: np.ndarray,
    f_prev: np.ndarray,
) -> np.ndarray:
    """KKT check of problems at their passive-set minimiser; violated constraints enter P.

    Returns the problems that go on (those with a violated constraint)."""
    if not len(probs):
        return probs
    W = U[probs] + lam[probs]
    Y = Y0[probs] + lam[probs] @ Mn
    violated = (-_threshold(W, n, s[probs], tol) > Y) & ~passive[probs]
    going = violated.any(axis=1)
    probs, violated, Y, W = probs[going], violated[going], Y[going], W[going]
    if not len(probs):
        return probs
    f = 0.5 * np.einsum("bt,bt->b", W, Y)
    single[probs] |= f >= f_prev[probs]  # the last all-at-once entry did not decrease the objective
    f_prev[probs] = f
    one = single[probs]
    if one.any():
        worst = np.argmin(np.where(violated[one], Y[one], np.inf), axis=1)
        violated[one] = False
        violated[one.nonzero()[0], worst] = True
    passive[probs] |= violated
    return probs


def _ridged(Mn: np.ndarray) -> np.ndarray:
    """Mn with the relative ridge T eps M_jj on its diagonal (as `_solve_block` adds it)."""
    T = Mn.shape[0]
    out = Mn.copy()
    diagonal = out.diagonal().copy()
    out.ravel()[:: T + 1] = diagonal + T * EPS * diagonal
    return out


def _bordered(ridged: np.ndarray) -> np.ndarray:
    """(2T, 2T): the ridged Mn bordered by zeros and an identity. A passive set P of size k padded to K
    indices with the distinct dummies T + j (j not in P) gathers to the block diag(M_PP + ridge, I), the
    padded system that `_solve_block` builds with masks."""
    T = ridged.shape[0]
    out = np.zeros((2 * T, 2 * T))
    out[:T, :T] = ridged
    out.ravel()[T * (2 * T + 1) :: 2 * T + 1] = 1.0
    return out


def _solve_gathered(
    bordered: np.ndarray, rhs: np.ndarray, passive: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """`_solve_passive` with flat gathers from `_bordered` instead of masks (rhs: (k, 2T), -(M u) then
    zeros): each row's P ascending, then its dummies, so the blocks and right-hand sides are
    `_solve_block`'s. Rows go in one padded chunk, or two (split by |P|) where that saves more Cholesky
    work than a second round of calls costs."""
    k, T = passive.shape
    z = np.zeros((k, 2 * T))
    indices = np.arange(T)
    keys = np.where(passive, indices, indices + T)
    keys.sort(axis=1)
    starts = np.arange(0, k * 2 * T, 2 * T)[:, None]
    for rows, K in _chunks(sizes):
        # contiguous: NumPy broadcasts a strided `order` below several times more slowly
        order = np.ascontiguousarray(keys[:, :K]) if rows is None else keys[rows, :K]
        flat = order + (starts if rows is None else starts[rows])  # positions in (k, 2T) arrays
        A = bordered.take((order * (2 * T))[:, :, None] + order[:, None, :])
        z.ravel()[flat] = _spd_solve(A, rhs.take(flat))
    return z[:, :T]


def _chunks(sizes: np.ndarray) -> list[tuple[np.ndarray | None, int]]:
    """Rows (None: all) and padded size of each chunk: one, or two split where sum n_c K_c^3 (the
    Cholesky flops) falls by more than _SPLIT_COST (a chunk's fixed cost in the same units)."""
    K = int(sizes.max())
    if K == 0:
        return []
    k = len(sizes)
    cubes = sizes.astype(np.float64) ** 3
    if k * cubes.max() - cubes.sum() <= _SPLIT_COST:  # no split can save more than the padding
        return [(None, K)]
    rows = np.argsort(sizes, kind="stable")
    cubes = cubes[rows]
    # first m rows padded to their largest size, the rest to K: m cubes[m - 1] + (k - m) K^3
    saved = np.arange(1, k) * (cubes[-1] - cubes[:-1])
    m = int(saved.argmax())
    if saved[m] <= _SPLIT_COST:
        return [(None, K)]
    return [(rows[: m + 1], int(sizes[rows[m]])), (rows[m + 1 :], K)]


def _spd_solve(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x_i = A_i^-1 rhs_i for a stack of symmetric positive definite blocks: a batched Cholesky (NumPy) and
    two batched triangular solves (torch's, on the same memory: NumPy has none), half an LU's flops;
    an LU where some block is not numerically positive definite."""
    try:
        L = torch.from_numpy(np.linalg.cholesky(A))
    except LinAlgError:
        return np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
    v = torch.linalg.solve_triangular(L, torch.from_numpy(rhs[:, :, None]), upper=False)
    return torch.linalg.solve_triangular(L.mT, v, upper=True).numpy()[:, :, 0]


def _solve_each(ridged: np.ndarray, Y0: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """`_solve_passive` one problem at a time, for large blocks (flops, not calls, dominate): each M_PP
    gathered unpadded, solved by LAPACK dposv (Cholesky), an LU where it is not positive definite."""
    k, T = passive.shape
    z = np.zeros((k, T))
    for b in range(k):
        idx = passive[b].nonzero()[0]
        if idx.size:
            block = ridged[np.ix_(idx, idx)]
            rhs = -Y0[b].take(idx)
            _, sol, info = dposv(block.T, rhs, 1, 0, 0)
            z[b, idx] = sol if info == 0 else np.linalg.solve(block, rhs)
    return z


def _solve_passive(Mn: np.ndarray, Y0: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """z with z_P solving (M_PP + ridge) z_P = -(M u)_P and z = 0 off P, for each row's P, batched.

    Rows are sorted by |P| and solved in chunks padded to the chunk's largest |P| (at most
    _CHUNK_ENTRIES matrix entries each), which bounds memory and wastes little work on padding."""
    k, T = passive.shape
    sizes = passive.sum(axis=1)
    z = np.zeros((k, T))
    rows = np.argsort(sizes, kind="stable")
    rows = rows[sizes[rows] > 0]
    start = 0
    while start < len(rows):
        K, stop = 0, start
        while stop < len(rows):  # grow the chunk while its padded blocks fit
            K_next = int(sizes[rows[stop]])
            if stop > start and (stop - start + 1) * K_next * K_next > _CHUNK_ENTRIES:
                break
            K, stop = K_next, stop + 1
        chunk = rows[start:stop]
        z[chunk] = _solve_block(Mn, Y0[chunk], passive[chunk], K)
        start = stop
    return z


def _solve_block(Mn: np.ndarray, Y0: np.ndarray, passive: np.ndarray, K: int) -> np.ndarray:
    T = Mn.shape[0]
    z = np.zeros(passive.shape)
    order = np.argsort(~passive, axis=1, kind="stable")[:, :K]  # each row's P first, ascending
    valid = np.take_along_axis(passive, order, axis=1)
    pair = valid[:, :, None] & valid[:, None, :]
    A = np.where(pair, Mn[order[:, :, None], order[:, None, :]], 0.0)
    diag = np.arange(K)
    A[:, diag, diag] += np.where(valid, T * EPS * A[:, diag, diag], 1.0)
    rhs = np.where(valid, -np.take_along_axis(Y0, order, axis=1), 0.0)
    sol = _cholesky_solve(A, rhs) if K >= _CHOLESKY_FROM else np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
    np.put_along_axis(z, order, np.where(valid, sol, 0.0), axis=1)
    return z


def _cholesky_solve(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves A_i x_i = rhs_i one block at a time by Cholesky (half an LU's flops: worth a Python loop
    for large blocks); a block that is not numerically positive definite gets an LU."""
    out = np.empty_like(rhs)
    for i in range(len(A)):
        try:
            out[i] = cho_solve(cho_factor(A[i], lower=True, overwrite_a=True, check_finite=False), rhs[i])
        except LinAlgError:
            out[i] = np.linalg.solve(A[i], rhs[i])
    return out
