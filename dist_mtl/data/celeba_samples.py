"""Decode the samples of a run of CelebA shards and check them against the manifest as they stream.

Each sample must hold a readable image and a label vector of the manifest's length; each shard must
hold exactly the number of samples the manifest lists for it. Every failure is a DataError naming the
shard file and the sample key, so a damaged shard is found and named instead of training on a silently
shortened split (a tar cut off between two samples reads as a complete, shorter tar).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dist_mtl.data.celeba_manifest import IMAGE_KEY, LABEL_KEY, MANIFEST_NAME, CelebAManifest, ShardEntry
from dist_mtl.data.images import decode_image, resize_square, to_chw
from dist_mtl.data.tar_samples import iter_tar_samples
from dist_mtl.errors import DataError


def _labels(data: bytes, width: int, where: str) -> np.ndarray:
    try:
        labels = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where}: {LABEL_KEY} is not a .npy array ({exc})") from None
    if labels.shape != (width,) or labels.dtype.kind not in "iub" or not np.isin(labels, (0, 1)).all():
        raise DataError(
            f"{where}: {LABEL_KEY} must hold {width} labels of 0 or 1 (one per manifest attribute), "
            f"got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def _decode(
    fields: dict[str, bytes], where: str, manifest: CelebAManifest, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    missing = [field for field in (IMAGE_KEY, LABEL_KEY) if field not in fields]
    if missing:
        raise DataError(
            f"{where}: no {' or '.join(missing)} (fields: {', '.join(sorted(fields)) or 'none'}); "
            "the shard is cut off or was not written by `dist-mtl data celeba`, convert again"
        )
    image = decode_image(fields[IMAGE_KEY], f"{where}: {IMAGE_KEY}")
    return to_chw(resize_square(image, image_size)), _labels(
        fields[LABEL_KEY], len(manifest.attributes), where
    )


class _Counter:
    """Samples read per shard and per run of shards, for messages that say where a count went wrong."""

    def __init__(self, directory: Path, split: str, entries: tuple[ShardEntry, ...]) -> None:
        self.directory = directory
        self.split = split
        self.entries = entries
        self.total = 0

    def error(self, entry: ShardEntry, held: str, key: str | None) -> DataError:
        names = [e.name for e in self.entries]
        listed = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        return DataError(
            f"{self.directory / entry.name}: holds {held} samples but {self.directory / MANIFEST_NAME} "
            f"lists {entry.count} (last key read: {key!r}); split {self.split!r} expects "
            f"{sum(e.count for e in self.entries)} samples from {len(names)} shards ({listed}), "
            f"{self.total} read so far: the shard is cut off or stale, convert again"
        )


def read_samples(
    directory: Path,
    manifest: CelebAManifest,
    split: str,
    entries: tuple[ShardEntry, ...],
    image_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x float32 (3, s, s), y int64 (A,)) for every sample of ``entries`` (shards of ``split``), in order.

    x is normalised with the manifest statistics. A shard with fewer samples than listed fails when
    it ends; one with more fails at the first sample past the listed count.
    """
    mean = np.asarray(manifest.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(manifest.std, dtype=np.float32)[:, None, None]
    counter = _Counter(directory, split, entries)
    for entry in entries:
        shard = directory / entry.name
        held, key = 0, None
        for key, fields in iter_tar_samples(shard):
            held += 1
            if held > entry.count:
                raise counter.error(entry, f"more than {entry.count}", key)
            x, y = _decode(fields, f"{shard}: sample {key!r}", manifest, image_size)
            counter.total += 1
            yield torch.from_numpy((x - mean) / std), torch.from_numpy(y)
        if held != entry.count:
            raise counter.error(entry, str(held), key)
