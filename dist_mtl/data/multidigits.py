"""MultiDigits: two real 8x8 digits from scikit-learn's bundled ``load_digits`` side by side on one canvas.

The source images are split into train and test *before* pairs are composed, so no test digit image
is ever seen in training. Tasks are either the two 10-way digits ("pair") or binary relations derived
from them ("binary"), which exercise many-task paths on real pixels.

Binary tasks, in this fixed order (``num_tasks`` takes the first ``num_tasks``; 43 in all):

- ``left_is_k``, k = 0..9, then ``right_is_k``, k = 0..9 (20)
- ``left_is_even``, ``right_is_even``, ``left_ge_5``, ``right_ge_5``, ``left_is_prime``,
  ``right_is_prime`` (6)
- ``left_gt_right``, ``left_lt_right``, ``left_eq_right`` (3)
- ``sum_mod_k_is_0``, k = 2..9, on left + right (8)
- ``sum_ge_k``, k in 6, 9, 12 (3), then ``abs_diff_le_k``, k in 1, 2, 4 (3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dist_mtl.data.base import MultiTaskDataset, TaskSpec
from dist_mtl.data.options import require_choice, require_float, require_int
from dist_mtl.errors import ConfigError

CANVAS_SHAPE = (1, 8, 16)
_PIXEL_MAX = 16.0  # load_digits pixel values are integers in [0, 16]
_PRIMES = np.array([2, 3, 5, 7])

Relation = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _binary_relations() -> tuple[tuple[str, Relation], ...]:
    """The documented list of binary tasks as (name, rule on the left and right digit arrays)."""
    rules: list[tuple[str, Relation]] = []
    rules += [(f"left_is_{k}", lambda a, b, k=k: a == k) for k in range(10)]
    rules += [(f"right_is_{k}", lambda a, b, k=k: b == k) for k in range(10)]
    rules += [
        ("left_is_even", lambda a, b: a % 2 == 0),
        ("right_is_even", lambda a, b: b % 2 == 0),
        ("left_ge_5", lambda a, b: a >= 5),
        ("right_ge_5", lambda a, b: b >= 5),
        ("left_is_prime", lambda a, b: np.isin(a, _PRIMES)),
        ("right_is_prime", lambda a, b: np.isin(b, _PRIMES)),
        ("left_gt_right", lambda a, b: a > b),
        ("left_lt_right", lambda a, b: a < b),
        ("left_eq_right", lambda a, b: a == b),
    ]
    rules += [(f"sum_mod_{k}_is_0", lambda a, b, k=k: (a + b) % k == 0) for k in range(2, 10)]
    rules += [(f"sum_ge_{k}", lambda a, b, k=k: a + b >= k) for k in (6, 9, 12)]
    rules += [(f"abs_diff_le_{k}", lambda a, b, k=k: np.abs(a - b) <= k) for k in (1, 2, 4)]
    return tuple(rules)


BINARY_RELATIONS = _binary_relations()
BINARY_TASK_NAMES: tuple[str, ...] = tuple(name for name, _ in BINARY_RELATIONS)


@dataclass(frozen=True)
class DigitPairs:
    """Composed canvases in [0, 1] with the source images they were made of (indices into load_digits)."""

    canvases: np.ndarray  # float32 (N, 1, 8, 16)
    left_source: np.ndarray  # int64 (N,)
    right_source: np.ndarray  # int64 (N,)
    left_digit: np.ndarray  # int64 (N,)
    right_digit: np.ndarray  # int64 (N,)


def split_sources(
    targets: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of source indices; every class keeps at least one image on each side."""
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_test = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _compose(
    images: np.ndarray, targets: np.ndarray, sources: np.ndarray, size: int, rng: np.random.Generator
) -> DigitPairs:
    left = rng.choice(sources, size=size)
    right = rng.choice(sources, size=size)
    canvases = np.concatenate([images[left], images[right]], axis=2)[:, None].astype(np.float32)
    return DigitPairs(canvases, left, right, targets[left].astype(np.int64), targets[right].astype(np.int64))


def compose_multidigits(
    *, seed: int, train_size: int, test_size: int, test_fraction: float
) -> tuple[DigitPairs, DigitPairs]:
    """Split the source digits, then compose pairs within each split (independent seeded streams)."""
    from sklearn.datasets import load_digits  # imported here: sklearn costs about a second per process

    digits = load_digits()
    images = digits.images / _PIXEL_MAX
    targets = digits.target
    train_sources, test_sources = split_sources(targets, test_fraction, np.random.default_rng([seed, 0]))
    train = _compose(images, targets, train_sources, train_size, np.random.default_rng([seed, 1]))
    test = _compose(images, targets, test_sources, test_size, np.random.default_rng([seed, 2]))
    return train, test


def _labels(pairs: DigitPairs, tasks: str, num_tasks: int) -> np.ndarray:
    if tasks == "pair":
        return np.stack([pairs.left_digit, pairs.right_digit], axis=1)
    rules = BINARY_RELATIONS[:num_tasks]
    return np.stack([rule(pairs.left_digit, pairs.right_digit) for _, rule in rules], axis=1).astype(np.int64)


def multidigits_tasks(tasks: str, num_tasks: int | None) -> tuple[TaskSpec, ...]:
    """The tasks of a configuration, checked; cheap, so the task count is known without building.

    ``tasks="pair"``: "left" and "right", 10 classes each; ``num_tasks`` must be unset, since it would
    otherwise be silently ignored. ``tasks="binary"``: the first ``num_tasks`` of ``BINARY_TASK_NAMES``
    (default: all of them).
    """
    require_choice("tasks", tasks, ("pair", "binary"))
    available = len(BINARY_TASK_NAMES)
    if tasks == "pair":
        if num_tasks is not None:
            raise ConfigError(
                f"data.num_tasks: multidigits with tasks 'pair' always has 2 tasks (left, right), got "
                f"num_tasks={num_tasks!r}; num_tasks applies only to tasks 'binary' (1..{available}): "
                "leave it unset or set data.tasks=binary"
            )
        return (TaskSpec("left", 10), TaskSpec("right", 10))
    if num_tasks is None:
        num_tasks = available
    require_int("num_tasks", num_tasks, minimum=1, maximum=available, where="multidigits with tasks 'binary'")
    return tuple(TaskSpec(name, 2) for name in BINARY_TASK_NAMES[:num_tasks])


def build_multidigits(
    *,
    seed: int,
    train_size: int = 20000,
    test_size: int = 4000,
    test_fraction: float = 0.2,
    tasks: str = "pair",
    num_tasks: int | None = None,
) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """Train and test splits, normalised with the train split's pixel mean and standard deviation.

    Tasks as ``multidigits_tasks(tasks, num_tasks)``.
    """
    require_int("train_size", train_size, minimum=1)
    require_int("test_size", test_size, minimum=1)
    require_float("test_fraction", test_fraction, low=0.0, high=1.0, open_low=True, open_high=True)
    specs = multidigits_tasks(tasks, num_tasks)
    train, test = compose_multidigits(
        seed=seed, train_size=train_size, test_size=test_size, test_fraction=test_fraction
    )
    mean, std = float(train.canvases.mean()), float(train.canvases.std())

    def finish(pairs: DigitPairs) -> MultiTaskDataset:
        x = torch.from_numpy(((pairs.canvases - mean) / std).astype(np.float32))
        return MultiTaskDataset(x=x, y=torch.from_numpy(_labels(pairs, tasks, len(specs))), tasks=specs)

    return finish(train), finish(test)
