"""``build_dataset``: one entry point from a data-set name and options to its data.

The bundled sets (multidigits, synthetic) are built in memory as (train, test) splits; shard
directories ("shards", and "celeba", the same reader under the name existing configs use) are a
streamed ``ShardSource``, of which only the manifest is read here.

``dataset_num_tasks`` answers "how many tasks" for the same options without building anything, so a
launcher can check a task layout in the parent process before it starts workers.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from dist_mtl.data.base import MultiTaskDataset
from dist_mtl.data.manifest import read_manifest
from dist_mtl.data.multidigits import build_multidigits, multidigits_tasks
from dist_mtl.data.stream import ShardSource, require_shard_path
from dist_mtl.data.synthetic import build_synthetic, synthetic_tasks
from dist_mtl.errors import ConfigError

Built = tuple[MultiTaskDataset, MultiTaskDataset] | ShardSource
Builder = Callable[..., Built]


def _shard_builder(name: str) -> Callable[..., ShardSource]:
    """The builder of data set ``name`` (a shard directory); its keyword names are the config's."""

    def build(
        *,
        seed: int,
        path: str | os.PathLike[str] | None = None,
        image_size: int = 64,
        max_samples: int | None = None,
        test_split: str = "test",
        workers: int = 0,
        shuffle_buffer: int = 2000,
        on_error: str = "raise",
    ) -> ShardSource:
        """The streamed source; ``seed`` is not used here: the order is a function of (seed, epoch,
        part), and the trainer passes the seed to each ``train_batches`` call."""
        return ShardSource(
            require_shard_path(path, name),
            image_size=image_size,
            max_samples=max_samples,
            test_split=test_split,
            workers=workers,
            shuffle_buffer=shuffle_buffer,
            on_error=on_error,
        )

    return build


_BUILDERS: dict[str, Builder] = {
    "multidigits": build_multidigits,
    "synthetic": build_synthetic,
    "celeba": _shard_builder("celeba"),
    "shards": _shard_builder("shards"),
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)
STREAMED_NAMES: tuple[str, ...] = ("celeba", "shards")


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    if name not in _BUILDERS:
        raise ConfigError(f"data.name: unknown data set {name!r}; valid: {', '.join(DATASET_NAMES)}")
    return dict(inspect.signature(_BUILDERS[name]).parameters)


def dataset_options(name: str) -> tuple[str, ...]:
    """The options ``build_dataset(name, ...)`` accepts besides ``seed``."""
    return tuple(p for p in _parameters(name) if p != "seed")


def _check_options(name: str, options: dict[str, Any]) -> None:
    valid = dataset_options(name)
    for option in options:
        if option not in valid:
            raise ConfigError(f"data.{option}: not an option of {name}; valid options: {', '.join(valid)}")


def build_dataset(name: str, *, seed: int, **options: Any) -> Built:
    """(train, test) in memory for the bundled sets, a ``ShardSource`` for the ``STREAMED_NAMES``.

    The same seed gives the same data. Unknown options are a ConfigError naming ``data.<option>``.
    """
    _check_options(name, options)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    return _BUILDERS[name](seed=seed, **options)


def _default(name: str, option: str) -> Any:
    return _parameters(name)[option].default


def _multidigits_count(tasks: str | None, num_tasks: int | None, path: str | os.PathLike[str]) -> int:
    return len(multidigits_tasks(_default("multidigits", "tasks") if tasks is None else tasks, num_tasks))


def _synthetic_count(tasks: str | None, num_tasks: int | None, path: str | os.PathLike[str]) -> int:
    return len(synthetic_tasks(_default("synthetic", "num_tasks") if num_tasks is None else num_tasks))


def _shards_count(name: str) -> Callable[[str | None, int | None, str | os.PathLike[str]], int]:
    def count(tasks: str | None, num_tasks: int | None, path: str | os.PathLike[str]) -> int:
        _check_options(name, {} if num_tasks is None else {"num_tasks": num_tasks})
        return len(read_manifest(require_shard_path(path, name)).tasks)

    return count


_COUNTERS: dict[str, Callable[[str | None, int | None, str | os.PathLike[str]], int]] = {
    "multidigits": _multidigits_count,
    "synthetic": _synthetic_count,
    **{name: _shards_count(name) for name in STREAMED_NAMES},
}


def dataset_num_tasks(
    name: str,
    *,
    tasks: str | None = None,
    num_tasks: int | None = None,
    path: str | os.PathLike[str] = "",
) -> int:
    """T, the number of tasks ``build_dataset(name, ...)`` would give, without building the data.

    multidigits: 2 for tasks "pair", ``num_tasks`` (default 43) for "binary"; synthetic: ``num_tasks``
    or the builder's default; shards / celeba: the task count of ``path``'s manifest (only the manifest
    is read). ``None`` means "not set" (the builder's default). ``tasks`` is read for multidigits only,
    since a config always carries a value for it; ``path`` for shard directories only. The checks and
    messages are the builders' own (ConfigError, or DataError for a bad manifest).
    """
    _parameters(name)  # unknown name: the same ConfigError as build_dataset
    return _COUNTERS[name](tasks, num_tasks, path)
