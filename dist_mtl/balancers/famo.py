"""FAMO (Liu et al., NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization"): logits of the tasks'
loss weights, moved so that the log losses decrease at balanced rates. No Gramian.

With z = softmax(xi) and D_t = L_t - min_t + 1e-8 (min_t = 0 here, as the official code's default;
1e-8 is the official code's guard), the step is the gradient of sum_t z_t log D_t / (sum_s z_s / D_s):
    c_t = (z_t / D_t) / sum_s (z_s / D_s)          (c sums to 1)
The logits move between steps (the paper's Algorithm 1, not the official code's Adam):
    Delta_t = log D_t(previous) - log D_t(now),   delta = J_z(xi)^T Delta = z * Delta - z (z . Delta),
    xi <- xi - famo_lr * (delta + famo_gamma * xi)
with the defaults of the official code: famo_lr 0.025 (its `w_lr`) and famo_gamma 0.001 (its
experiments' `gamma`; Adam's weight decay there, the paper's decay gamma here). The official code runs
Adam on the same gradient and needs one more forward pass after the optimizer step to evaluate the
losses at the new parameters on the same batch; here Delta is the change between the losses of
consecutive steps (different batches), so FAMO costs nothing beyond the losses: at step k the logits
are first updated with Delta from (L(k-1), L(k)), then c(k) is formed from them and L(k). The first
step has no previous losses: xi stays 0 (uniform z). With plain gradient steps the logits move slowly
(|delta| is about |Delta| / T per step); raise famo_lr to make FAMO react faster.

Missing labels: a task with loss 0 has no labelled sample in the batch; it gets c = 0 (the others are
normalised among themselves) and Delta = 0 for every update that involves such a loss.
State (checkpointed): xi and the previous step's losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_mtl.balancers.base import LossBalancer, check_num_tasks, check_number

DEFAULT_FAMO_LR = 0.025
DEFAULT_FAMO_GAMMA = 0.001
GUARD = 1e-8  # the official code's D = L - min_losses + 1e-8


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def famo_logit_step(
    xi: np.ndarray, previous: np.ndarray, losses: np.ndarray, lr: float, gamma: float
) -> np.ndarray:
    """One update of the logits from two consecutive loss vectors (a task with a zero loss in either
    has no usable change: Delta_t = 0)."""
    usable = (previous > 0.0) & (losses > 0.0)
    delta_log = np.where(usable, np.log(previous + GUARD) - np.log(losses + GUARD), 0.0)
    z = softmax(xi)
    grad = z * delta_log - z * float(z @ delta_log)  # J^T Delta, J = diag(z) - z z^T (symmetric)
    return xi - lr * (grad + gamma * xi)


def famo_coefficients(xi: np.ndarray, losses: np.ndarray, active: np.ndarray) -> np.ndarray:
    """c_t = (z_t / D_t) / sum_s (z_s / D_s) over the active tasks, 0 elsewhere."""
    z = softmax(xi)
    ratio = np.where(active, z / (losses + GUARD), 0.0)
    return ratio / ratio.sum()


@dataclass
class FAMO(LossBalancer):
    """FAMO's weights from its logits; the logits move with the change of the log losses."""

    famo_lr: float = DEFAULT_FAMO_LR
    famo_gamma: float = DEFAULT_FAMO_GAMMA
    xi: np.ndarray | None = field(default=None, init=False, repr=False)
    previous: np.ndarray | None = field(default=None, init=False, repr=False)

    name = "famo"

    def __post_init__(self) -> None:
        self.famo_lr = check_number("balancer.famo_lr", self.famo_lr, low=0.0)
        self.famo_gamma = check_number("balancer.famo_gamma", self.famo_gamma, low=0.0, low_open=False)

    def loss_weights(
        self, losses: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float], Any]:
        check_num_tasks(self.name, None if self.xi is None else len(self.xi), losses)
        xi = np.zeros(losses.shape[0]) if self.xi is None else self.xi
        if self.previous is not None:
            xi = famo_logit_step(xi, self.previous, losses, self.famo_lr, self.famo_gamma)
        c = famo_coefficients(xi, losses, active)
        z = softmax(xi)
        info = {"famo_z_max": float(z.max()), "famo_z_min": float(z.min())}
        return c, info, (xi.copy(), losses.copy())

    def take(self, pending: Any) -> None:
        self.xi, self.previous = pending

    def state_dict(self) -> dict[str, Any]:
        return {
            "xi": None if self.xi is None else self.xi.tolist(),
            "previous": None if self.previous is None else self.previous.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"xi", "previous"}:
            raise ValueError(f"famo state must have keys previous, xi; got {sorted(state)}")
        xi, previous = (
            None if state[k] is None else np.asarray(state[k], dtype=np.float64) for k in ("xi", "previous")
        )
        if xi is not None and previous is not None and xi.shape != previous.shape:
            raise ValueError(f"famo state: xi has {xi.size} entries but previous has {previous.size}")
        self.xi, self.previous = xi, previous
