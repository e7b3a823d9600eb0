"""The order in which a stream visits samples: a pure function of (seed, epoch, part index, parts).

Samples are named by their *ordinal*, their position in the split in manifest order, so the order
of an epoch is an array of ints computed without reading a byte of data: a seeded permutation of the
part's shards, then a seeded shuffle buffer simulated on the ordinals. Every rank that computes it
with the same arguments gets the same array; a resumed run computes the same array again.

Parts (data-parallel replicas) are dealt whole shards, fixed for the run: part r of P reads shards
r, r + P, r + 2P, ... of the split, so parts never share a sample and their shard sets do not depend
on the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_mtl.data.manifest import ShardManifest
from dist_mtl.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class SplitView:
    """The samples of one split a source sees: the first ``max_samples`` in manifest order.

    ``counts`` are the samples used per shard (the last shard may be cut by ``max_samples``; shards
    past it are dropped), ``listed`` the manifest's counts (what the shard must really hold).
    """

    split: str
    names: tuple[str, ...]
    counts: np.ndarray  # int64, one per shard kept, each >= 1
    listed: tuple[int, ...]
    starts: np.ndarray  # int64, ordinal of each shard's first sample; starts[-1] + counts[-1] = total
    max_samples: int | None

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def locate(self, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, offset within the shard) of each ordinal."""
        shard = np.searchsorted(self.starts, ordinals, side="right") - 1
        return shard, ordinals - self.starts[shard]


def split_view(manifest: ShardManifest, split: str, max_samples: int | None) -> SplitView:
    """The view of ``split`` (a DataError lists the splits if it is absent) cut at ``max_samples``."""
    names, counts, listed = [], [], []
    left = max_samples if max_samples is not None else manifest.count(split)
    for entry in manifest.shards(split):
        used = min(entry.count, left)
        if used > 0:
            names.append(entry.name)
            counts.append(used)
            listed.append(entry.count)
        left -= used
    counts_array = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts_array)[:-1]]).astype(np.int64)
    return SplitView(split, tuple(names), counts_array, tuple(listed), starts, max_samples)


def part_shards(view: SplitView, index: int, parts: int) -> np.ndarray:
    """Positions (in ``view``) of the shards part ``index`` of ``parts`` reads: index, index + parts, ..."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part: expected (index, parts) with 0 <= index < parts, got ({index}, {parts})")
    have = len(view.names)
    if have < parts:
        cut = f" (the first data.max_samples={view.max_samples})" if view.max_samples is not None else ""
        largest = max(view.total // parts, 1)
        raise DataError(
            f"split {view.split!r} has {have} shards{cut} but {parts} data-parallel parts read it; each "
            f"part reads whole shards, so convert again with shard_size <= {largest} or use fewer replicas"
        )
    return np.arange(index, have, parts)


def part_count(view: SplitView, index: int, parts: int) -> int:
    """Samples part ``index`` of ``parts`` reads per epoch."""
    return int(view.counts[part_shards(view, index, parts)].sum())


def local_batch(view: SplitView, batch_size: int, parts: int) -> int:
    """A part's share of the global ``batch_size``; a ConfigError unless it divides and fits every part."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.batch_size: expected an integer >= 1, got {batch_size!r}")
    if batch_size % parts:
        raise ConfigError(
            f"data.batch_size {batch_size} is not divisible by the {parts} data-parallel parts that share "
            "each global batch; use a multiple of the replica count"
        )
    local = batch_size // parts
    smallest = min(part_count(view, r, parts) for r in range(parts))
    if local > smallest:
        raise ConfigError(
            f"data.batch_size {batch_size}: each of the {parts} parts takes {local} samples a step, but the "
            f"smallest part of split {view.split!r} holds {smallest}; use data.batch_size <= "
            f"{smallest * parts}"
        )
    return local


def steps_per_epoch(view: SplitView, batch_size: int, parts: int) -> int:
    """Drop-last batches per epoch, the same for every part: min over parts of n_part // local batch."""
    local = local_batch(view, batch_size, parts)
    return min(part_count(view, r, parts) for r in range(parts)) // local


def shuffle_buffer(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``size`` emits ``stream`` in (as webdataset's ``shuffle``).

    The buffer fills with the first ``size`` items; each further item replaces a uniformly drawn
    slot, whose occupant is emitted; at the end the buffer drains in a random order. ``size`` 1 keeps
    the order. Simulated on ordinals, so nothing is read to know it.
    """
    n = len(stream)
    if n == 0:
        return stream.copy()
    k = min(size, n)
    items = stream.tolist()
    buffer = items[:k]
    out = []
    for j, item in zip(rng.integers(0, k, size=n - k).tolist(), items[k:], strict=True):
        out.append(buffer[j])
        buffer[j] = item
    tail = [buffer[i] for i in rng.permutation(k).tolist()]
    return np.asarray(out + tail, dtype=np.int64)


def epoch_order(
    view: SplitView, *, seed: int, epoch: int, index: int, parts: int, buffer_size: int
) -> np.ndarray:
    """Ordinals part ``index`` of ``parts`` visits in ``epoch``, all of its samples once.

    One generator seeded with (seed, epoch, index) permutes the part's shards, then drives the
    shuffle buffer over their samples in that shard order.
    """
    shards = part_shards(view, index, parts)
    rng = np.random.default_rng([seed, epoch, index])
    shards = shards[rng.permutation(len(shards))]
    stream = np.concatenate(
        [np.arange(view.starts[s], view.starts[s] + view.counts[s], dtype=np.int64) for s in shards]
    )
    return shuffle_buffer(stream, buffer_size, rng)


def replica_shards(
    manifest: ShardManifest, split: str, *, replica_index: int, num_replicas: int
) -> tuple[str, ...]:
    """Names of the shards of ``split`` that replica ``replica_index`` of ``num_replicas`` reads."""
    view = split_view(manifest, split, None)
    return tuple(view.names[s] for s in part_shards(view, replica_index, num_replicas))
