"""The host side of a step: one copy of the Gramian and losses to the CPU, the balancer, diagnostics.

This is the only device-to-host transfer in a training step. A non-finite Gramian or loss skips
the step (the caller leaves the parameters alone and counts it) instead of poisoning them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dist_mtl.balancers import Balancer
from dist_mtl.observe.gramians import gradient_cosines


@dataclass
class Solution:
    """Balancer result on the host, in float64."""

    coefficients: torch.Tensor  # (T,) direction d = G c
    losses: torch.Tensor  # (T,) the task losses that went into the solve
    skipped: bool  # True when the Gramian or losses were not finite
    info: dict[str, float] = field(default_factory=dict)
    gramian: torch.Tensor | None = None  # (T, T) on the host, on the process that solved; else None
    events: dict[str, int] = field(default_factory=dict)  # this step's counts (`step_events`); {} if skipped

    def diagnostics(self) -> dict[str, float]:
        """Gradient cosines and the descent check, O(T^2): computed only for the steps that are logged."""
        if self.gramian is None or self.skipped:
            return {}
        return gramian_diagnostics(self.gramian.numpy(), self.coefficients.numpy())


def gramian_diagnostics(gramian: np.ndarray, coefficients: np.ndarray) -> dict[str, float]:
    """Pairwise cosines of the task gradients and whether d decreases every task to first order."""
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    cos = gradient_cosines(gramian)
    t = gramian.shape[0]
    out = {"grad/norm_mean": float(norms.mean())}
    if t > 1:
        pairs = cos[np.triu_indices(t, k=1)]
        out |= {
            "grad/cos_min": float(pairs.min()),
            "grad/cos_mean": float(pairs.mean()),
            "grad/conflict_fraction": float((pairs < 0).mean()),
        }
    # <g_t, d> = (M c)_t: the first-order change of task t's loss along -d is -(M c)_t.
    out["direction/decreases_all_tasks"] = float(bool(np.all(gramian @ coefficients > 0)))
    return out


def step_events(info: dict[str, float]) -> dict[str, int]:
    """This step's event counts, from the balancer's info, for running totals over a run.

    - unconverged_solves: 1 if any solve of this call stopped unconverged (every `*_converged` info
      key: the min-norm solve, GetMTL's step 3), else 0; present for every balancer.
    - getmtl_capped: 1 if GetMTL's factor 1 / (1 - eps ||g0||) hit balancer.max_scale (GetMTL only).
    - degenerate_*: the balancer's degenerate-branch counters as they are (MGDA: zero_norm (how many
      normalisers were clamped), pareto_stationary; GetMTL: zero_gw, no_scale).
    """
    unconverged = any(v == 0.0 for k, v in info.items() if k.endswith("_converged"))
    events = {"unconverged_solves": int(unconverged)}
    events |= {k: int(v) for k, v in info.items() if k == "getmtl_capped" or k.startswith("degenerate_")}
    return events


def solve_on_host(balancer: Balancer, gramian: torch.Tensor | None, losses: torch.Tensor) -> Solution:
    """Move (M, losses) to the CPU in one copy, check them, run the balancer and adopt its new state.

    `gramian` is None for a balancer that does not read it (`Balancer.needs_gramian` False): then the
    copy is the T losses alone.
    """
    t = losses.numel()
    flat_losses = losses.detach().reshape(-1)
    if gramian is None:
        host = flat_losses.to("cpu", torch.float64)
        m_host, l_host = None, host
    else:
        packed = torch.cat([gramian.detach().reshape(-1), flat_losses.to(gramian.dtype)])
        host = packed.to("cpu", torch.float64)
        m_host, l_host = host[: t * t].view(t, t), host[t * t :]
    if not bool(torch.isfinite(host).all()):
        return Solution(torch.zeros(t, dtype=torch.float64), l_host, True, {"solver/skipped": 1.0})
    start = time.perf_counter()
    out = balancer(m_host, l_host)
    seconds = time.perf_counter() - start
    # Only adopted steps move the balancer's state (MAMG's orders, FAMO's logits); skipped ones do not.
    balancer.adopt(out)
    coefficients = out.coefficients.to(torch.float64)
    info = {f"solver/{k.removeprefix('solver_')}": float(v) for k, v in out.info.items()}
    info["solver/seconds"] = seconds
    return Solution(coefficients, l_host, False, info, m_host, step_events(out.info))


# What a step does (`step_plan`), the same on every rank:
GRAMIAN = "gramian"  # T backward passes, the Gramian exchanged and solved (the balancer reads M)
LOSSES = "losses"  # the T losses to the coordinator, solve, then ONE backward of sum_t c_t L_t
REUSE = "reuse"  # update_every between updates: the kept c, ONE backward, no exchange before it


def step_plan(balancer: Balancer) -> tuple[str, torch.Tensor | None]:
    """(kind, the coefficients to reuse or None). Every rank gets the same answer: `reuse` depends only
    on what `Balancer.follow` recorded, and `needs_gramian` only on the balancer's kind."""
    kept = balancer.reuse()
    if kept is not None:
        return REUSE, torch.from_numpy(np.array(kept, dtype=np.float64, copy=True))
    return (GRAMIAN if balancer.needs_gramian else LOSSES), None


def single_backward_solution(
    kind: str, coefficients: torch.Tensor, checked: torch.Tensor, solved: Solution | None
) -> Solution:
    """The Solution of a one-backward step, from the host copy `checked` = [T losses | 1 if the reduced
    gradient is finite else 0] that every rank holds after the gradient all-reduce (identical on every
    rank, so every rank skips the same steps). `solved`: the coordinator's result on a LOSSES step."""
    losses, finite = checked[:-1], bool(checked[-1] > 0) and bool(torch.isfinite(checked).all())
    marks = {"step/gramian": 0.0, "step/encoder_backwards": 1.0}
    if not finite:
        info = {"solver/skipped": 1.0, **marks}
        return Solution(torch.zeros_like(coefficients), losses, True, info)
    if kind == REUSE or solved is None:
        return Solution(coefficients.to(torch.float64), losses, False, {"solver/reused": 1.0, **marks})
    solved.info.update(marks)
    return solved


def mark_gramian_step(solution: Solution, backwards: int) -> Solution:
    """Record on a T-backward step's solution that the Gramian was formed and how many encoder
    backward passes this rank ran."""
    solution.info.update({"step/gramian": 1.0, "step/encoder_backwards": float(backwards)})
    return solution
