"""Uniform scaling, c_t = 1/T: the baseline every figure is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.balancers.base import Balancer, uniform_weights


@dataclass(frozen=True)
class Uniform(Balancer):
    """d = (1/T) sum_t g_t, the gradient of the mean loss."""

    name = "uniform"

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        return uniform_weights(M.shape[0]), {}
