"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned log-variances s_t. No Gramian.

The objective is sum_t exp(-s_t) L_t + s_t, so the shared parameters get c_t = exp(-s_t) (not
normalised: the weights' scale is learned too) and s gets the analytic gradient
    d/ds_t = 1 - exp(-s_t) L_t,
whose stationary point is s_t = log L_t (c_t = 1 / L_t). s starts at 0 (c = 1) and takes one Adam step
per adopted step (torch.optim.Adam's rule, written out in float64: betas 0.9 / 0.999, eps 1e-8, no
weight decay, learning rate balancer.uw_lr), as the original trains s jointly with the network: c at
step k is exp(-s(k)), and s(k+1) is the Adam step from s(k) with the gradient at L(k). This is the
form many implementations use for every task (Kendall's paper has 1/(2 sigma^2) for regression and
1/sigma^2 for classification, with s = log sigma^2 and a log sigma regulariser).

Missing labels: a task with loss 0 (no labelled sample in the batch) gets c = 0 and its s and Adam
moments stay as they are (its own step count does not advance, so its bias correction is that of the
steps it took part in). State (checkpointed): s, the Adam moments and the per-task step counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_mtl.balancers.base import LossBalancer, check_num_tasks, check_number

DEFAULT_UW_LR = 1e-3
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
_KEYS = ("s", "m", "v", "steps")


def uw_gradient(s: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """d/ds of sum_t exp(-s_t) L_t + s_t."""
    return 1.0 - np.exp(-s) * losses


def adam_step(
    s: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    steps: np.ndarray,
    grad: np.ndarray,
    lr: float,
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch.optim.Adam's update (no weight decay, no amsgrad) on the entries in `mask`."""
    steps = steps + mask
    m = np.where(mask, BETA1 * m + (1 - BETA1) * grad, m)
    v = np.where(mask, BETA2 * v + (1 - BETA2) * grad * grad, v)
    t = np.maximum(steps, 1)
    m_hat_scale = lr / (1 - BETA1**t)
    denom = np.sqrt(v) / np.sqrt(1 - BETA2**t) + ADAM_EPS
    s = np.where(mask, s - m_hat_scale * m / denom, s)
    return s, m, v, steps


@dataclass
class UW(LossBalancer):
    """c_t = exp(-s_t); s takes an Adam step on the gradient of sum_t exp(-s_t) L_t + s_t."""

    uw_lr: float = DEFAULT_UW_LR
    state: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)

    name = "uw"

    def __post_init__(self) -> None:
        self.uw_lr = check_number("balancer.uw_lr", self.uw_lr, low=0.0)

    def loss_weights(
        self, losses: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float], Any]:
        t = losses.shape[0]
        check_num_tasks(self.name, None if self.state is None else len(self.state["s"]), losses)
        st = self.state or {
            "s": np.zeros(t),
            "m": np.zeros(t),
            "v": np.zeros(t),
            "steps": np.zeros(t, dtype=np.int64),
        }
        c = np.where(active, np.exp(-st["s"]), 0.0)
        grad = uw_gradient(st["s"], losses)
        s, m, v, steps = adam_step(st["s"], st["m"], st["v"], st["steps"], grad, self.uw_lr, active)
        info = {"uw_s_min": float(st["s"].min()), "uw_s_max": float(st["s"].max())}
        return c, info, {"s": s, "m": m, "v": v, "steps": steps}

    def take(self, pending: Any) -> None:
        self.state = pending

    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            return {k: None for k in _KEYS}
        return {k: self.state[k].tolist() for k in _KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(_KEYS):
            raise ValueError(f"uw state must have keys {', '.join(sorted(_KEYS))}; got {sorted(state)}")
        if all(state[k] is None for k in _KEYS):
            self.state = None
            return
        arrays = {k: np.asarray(state[k], dtype=np.int64 if k == "steps" else np.float64) for k in _KEYS}
        if len({a.shape for a in arrays.values()}) != 1 or arrays["s"].ndim != 1:
            raise ValueError("uw state: s, m, v and steps must be vectors of the same length")
        self.state = arrays
