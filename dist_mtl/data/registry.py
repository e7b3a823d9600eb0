"""``build_dataset``: one entry point from a data-set name and options to (train, test) splits."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dist_mtl.data.base import MultiTaskDataset
from dist_mtl.data.celeba_reader import build_celeba
from dist_mtl.data.multidigits import build_multidigits
from dist_mtl.data.synthetic import build_synthetic
from dist_mtl.errors import ConfigError

Builder = Callable[..., tuple[MultiTaskDataset, MultiTaskDataset]]

_BUILDERS: dict[str, Builder] = {
    "multidigits": build_multidigits,
    "synthetic": build_synthetic,
    "celeba": build_celeba,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def dataset_options(name: str) -> tuple[str, ...]:
    """The options ``build_dataset(name, ...)`` accepts besides ``seed``."""
    if name not in _BUILDERS:
        raise ConfigError(f"data.name: unknown data set {name!r}; valid: {', '.join(DATASET_NAMES)}")
    parameters = inspect.signature(_BUILDERS[name]).parameters
    return tuple(p for p in parameters if p != "seed")


def build_dataset(name: str, *, seed: int, **options: Any) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """Build the (train, test) splits of data set ``name``; the same seed gives the same data."""
    valid = dataset_options(name)
    for option in options:
        if option not in valid:
            raise ConfigError(f"data.{option}: not an option of {name}; valid options: {', '.join(valid)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    return _BUILDERS[name](seed=seed, **options)
