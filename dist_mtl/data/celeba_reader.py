"""Read CelebA webdataset shards: whole splits into memory, or one replica's shards as a stream.

Samples are read and checked by ``celeba_samples.read_samples``: a damaged shard, or one holding
another number of samples than the manifest lists, is a DataError naming the shard and the key.

Streams are sharded by *replica index*, not by rank: every rank of a task group shares one batch, so
all of them must read the same samples in the same order. Replica r of D reads shards r, r + D,
r + 2D, ... of the split; ranks that pass the same replica index (and seed) get identical sequences,
and different replica indices read disjoint shards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dist_mtl.data.base import MultiTaskDataset, TaskSpec
from dist_mtl.data.celeba_layout import CELEBA_SPLITS
from dist_mtl.data.celeba_manifest import CelebAManifest, ShardEntry, read_manifest
from dist_mtl.data.celeba_samples import read_samples
from dist_mtl.data.options import require_choice, require_int
from dist_mtl.errors import ConfigError, DataError


def _replica_entries(
    manifest: CelebAManifest, split: str, *, replica_index: int, num_replicas: int
) -> tuple[ShardEntry, ...]:
    shards = manifest.shards(split)
    if not 0 <= replica_index < num_replicas:
        raise ValueError(f"replica_index must be in [0, {num_replicas}), got {replica_index}")
    if not shards:
        raise DataError(f"split {split!r} has no samples in this shard directory")
    if num_replicas > len(shards):
        largest = max(manifest.count(split) // num_replicas, 1)
        raise DataError(
            f"split {split!r} has {len(shards)} shards but {num_replicas} replicas read it; every replica "
            f"needs a shard: convert again with shard_size <= {largest}"
        )
    return shards[replica_index::num_replicas]


def replica_shards(
    manifest: CelebAManifest, split: str, *, replica_index: int, num_replicas: int
) -> tuple[str, ...]:
    """Names of the shards of ``split`` that replica ``replica_index`` of ``num_replicas`` reads."""
    entries = _replica_entries(manifest, split, replica_index=replica_index, num_replicas=num_replicas)
    return tuple(entry.name for entry in entries)


def iter_celeba_shards(
    path: str | os.PathLike[str],
    split: str,
    *,
    replica_index: int,
    num_replicas: int,
    image_size: int = 64,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An iterator of (x float32 (3, s, s), y int64 (40,)) over this replica's shards of ``split``.

    ``seed=None`` visits the shards in manifest order; an integer permutes this replica's shards with
    that seed (pass the same seed on every rank of the group, e.g. ``seed + epoch``). Arguments and
    files are checked here, before the first sample is read.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    require_int("image_size", image_size, minimum=1)
    entries = _replica_entries(manifest, split, replica_index=replica_index, num_replicas=num_replicas)
    if seed is not None:
        entries = tuple(entries[i] for i in np.random.default_rng(seed).permutation(len(entries)))
    return read_samples(directory, manifest, split, entries, image_size)


def load_celeba_split(
    path: str | os.PathLike[str], split: str, *, image_size: int = 64, max_samples: int | None = None
) -> MultiTaskDataset:
    """The first ``max_samples`` samples (default: all) of ``split`` in manifest order, in memory."""
    directory = Path(path)
    manifest = read_manifest(directory)
    samples = read_samples(directory, manifest, split, manifest.shards(split), image_size)
    pairs = list(itertools.islice(samples, max_samples))
    if pairs:
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
    else:
        x = torch.empty((0, 3, image_size, image_size))
        y = torch.empty((0, len(manifest.attributes)), dtype=torch.int64)
    return MultiTaskDataset(x=x, y=y, tasks=tuple(TaskSpec(name, 2) for name in manifest.attributes))


def require_shard_path(path: str | os.PathLike[str] | None) -> Path:
    """``data.path`` as a Path if it names an existing directory; a ConfigError otherwise."""
    if path is None or str(path) == "":
        raise ConfigError(
            "data.path: celeba needs the directory of shards written by `dist-mtl data celeba ROOT OUT`"
        )
    if not Path(path).is_dir():
        raise ConfigError(f"data.path: no such directory: {path}")
    return Path(path)


def build_celeba(
    *,
    seed: int,
    path: str | os.PathLike[str] | None = None,
    image_size: int = 64,
    max_samples: int | None = None,
    test_split: str = "test",
) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """Train split and ``test_split`` ("val" or "test") of a shard directory, in memory.

    Samples come in manifest order (the first ``max_samples`` of each split), so ``seed`` does not
    change the data; the trainer's seeded batch order does the shuffling.
    """
    require_shard_path(path)
    require_int("image_size", image_size, minimum=1)
    if max_samples is not None:
        require_int("max_samples", max_samples, minimum=1)
    require_choice("test_split", test_split, tuple(s for s in CELEBA_SPLITS if s != "train"))
    train = load_celeba_split(path, "train", image_size=image_size, max_samples=max_samples)
    test = load_celeba_split(path, test_split, image_size=image_size, max_samples=max_samples)
    return train, test
