"""Synthetic many-task problems with planted conflicts, for scale (T up to 1000) and solver tests.

Inputs are x ~ N(0, I_d). Task t is binary with label 1[w_t . x + label_noise * e > 0], e ~ N(0, 1),
and unit direction w_t. Conflicts are planted through the directions:

- The T tasks are split into ``num_clusters`` contiguous, balanced blocks (task t is in cluster
  ``t * num_clusters // T``), so a contiguous task layout gives whole clusters to ranks.
- Clusters come in conflicting pairs (0, 1), (2, 3), ...: pair j has a random unit centre u_j and its
  partner centre -conflict * u_j + sqrt(1 - conflict^2) * v_j with v_j a random unit vector orthogonal
  to u_j, so the two centres have cosine exactly -conflict. With an odd count the last cluster has no
  partner. Centres of different pairs are independent random directions.
- w_t is the normalised cluster centre plus ``spread`` times an isotropic perturbation of norm about 1,
  so tasks of one cluster agree (cosine about 1 / (1 + spread^2)) and tasks of partner clusters
  disagree (cosine about -conflict / (1 + spread^2)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_mtl.data.base import MultiTaskDataset, TaskSpec
from dist_mtl.data.options import require_float, require_int


@dataclass(frozen=True)
class SyntheticProblem:
    """The planted structure: one unit direction and one cluster per task."""

    directions: np.ndarray  # float64 (T, d), unit rows
    clusters: np.ndarray  # int64 (T,)
    label_noise: float

    def partner(self, cluster: int) -> int | None:
        """The cluster planted to conflict with ``cluster``, or None for an unpaired last cluster."""
        other = cluster ^ 1
        return other if other <= int(self.clusters.max()) else None

    def sample(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``size`` inputs (float32) and their labels (int64, one column per task)."""
        d = self.directions.shape[1]
        x = rng.standard_normal((size, d), dtype=np.float32)
        margins = x @ self.directions.T.astype(np.float32)
        margins += self.label_noise * rng.standard_normal(margins.shape, dtype=np.float32)
        return x, (margins > 0).astype(np.int64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def plant_directions(
    *,
    num_tasks: int,
    input_dim: int,
    num_clusters: int,
    conflict: float,
    spread: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Task directions (T, d) and clusters (T,) as described in the module docstring."""
    centres = np.empty((num_clusters, input_dim))
    for first in range(0, num_clusters, 2):
        u = _unit(rng.standard_normal(input_dim))
        centres[first] = u
        if first + 1 < num_clusters:
            v = rng.standard_normal(input_dim)
            v = _unit(v - (v @ u) * u)
            centres[first + 1] = -conflict * u + np.sqrt(1.0 - conflict**2) * v
    clusters = np.arange(num_tasks) * num_clusters // num_tasks
    perturbation = rng.standard_normal((num_tasks, input_dim)) / np.sqrt(input_dim)
    return _unit(centres[clusters] + spread * perturbation), clusters.astype(np.int64)


def make_synthetic_problem(
    *,
    seed: int,
    num_tasks: int,
    input_dim: int,
    num_clusters: int,
    conflict: float,
    spread: float,
    label_noise: float,
) -> SyntheticProblem:
    """The seeded problem (directions depend on the seed only, not on the split sizes)."""
    directions, clusters = plant_directions(
        num_tasks=num_tasks,
        input_dim=input_dim,
        num_clusters=num_clusters,
        conflict=conflict,
        spread=spread,
        rng=np.random.default_rng([seed, 0]),
    )
    return SyntheticProblem(directions, clusters, label_noise)


def synthetic_tasks(num_tasks: int) -> tuple[TaskSpec, ...]:
    """``num_tasks`` binary tasks named ``task_000`` ... (zero-padded so that names sort in task order)."""
    require_int("num_tasks", num_tasks, minimum=1)
    width = len(str(num_tasks - 1))
    return tuple(TaskSpec(f"task_{t:0{width}d}", 2) for t in range(num_tasks))


def build_synthetic(
    *,
    seed: int,
    num_tasks: int = 16,
    input_dim: int = 64,
    train_size: int = 20000,
    test_size: int = 4000,
    num_clusters: int = 4,
    conflict: float = 0.8,
    spread: float = 0.5,
    label_noise: float = 0.1,
    missing_labels: float = 0.0,
) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """Train and test splits of the planted problem; x is standard normal, so already normalised.

    ``missing_labels``: the fraction of (sample, task) labels replaced by -1 ("no label"), drawn
    independently and seeded, to exercise partially labelled multi-task data.
    """
    specs = synthetic_tasks(num_tasks)
    require_int("input_dim", input_dim, minimum=2)
    require_int("train_size", train_size, minimum=1)
    require_int("test_size", test_size, minimum=1)
    require_int("num_clusters", num_clusters, minimum=1, maximum=num_tasks)
    require_float("conflict", conflict, low=0.0, high=1.0, open_low=False, open_high=False)
    require_float("spread", spread, low=0.0, high=100.0, open_low=False, open_high=False)
    require_float("label_noise", label_noise, low=0.0, high=100.0, open_low=False, open_high=False)
    require_float("missing_labels", missing_labels, low=0.0, high=1.0, open_low=False, open_high=True)
    problem = make_synthetic_problem(
        seed=seed,
        num_tasks=num_tasks,
        input_dim=input_dim,
        num_clusters=num_clusters,
        conflict=conflict,
        spread=spread,
        label_noise=label_noise,
    )

    def split(size: int, stream: int) -> MultiTaskDataset:
        x, y = problem.sample(size, np.random.default_rng([seed, stream]))
        if missing_labels:
            y[np.random.default_rng([seed, stream, 1]).random(y.shape) < missing_labels] = -1
        return MultiTaskDataset(x=torch.from_numpy(x), y=torch.from_numpy(y), tasks=specs)

    return split(train_size, 1), split(test_size, 2)
