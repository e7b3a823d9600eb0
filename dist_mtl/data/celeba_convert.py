"""Convert a local CelebA copy into ``dist_mtl-shards/1`` webdataset shards per split plus ``manifest.json``.

Each sample holds its image as ``jpg`` (the original bytes, or a square re-encoding at ``image_size``)
and its 40 attributes as ``cls.npy`` (int8, 0/1). The output directory appears atomically
(``shard_writer.staged_output``), so a reader never sees half a conversion.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dist_mtl.data.base import TaskSpec
from dist_mtl.data.celeba_layout import CELEBA_ATTRIBUTES, CELEBA_SPLITS, CelebAIndex, load_celeba_index
from dist_mtl.data.images import decode_image, resize_square
from dist_mtl.data.manifest import MANIFEST_NAME, ShardManifest, SplitEntry, write_manifest
from dist_mtl.data.shard_writer import (
    ChannelStats,
    SplitWriter,
    check_output_dir,
    check_shard_size,
    label_dtype,
    staged_output,
)
from dist_mtl.errors import ConfigError

# Samples per shard, for the function and the command line alike. CelebA has 162,770 / 19,867 /
# 19,962 train / val / test images. A tar sample takes about 11 KB with the original 178 x 218 JPEGs
# (7 KB on average, plus about 3.5 KB of tar headers for its two members) and about 6-7 KB at 64 x 64,
# so shards are roughly 20 MB (13 MB resized): large enough that reading is sequential, small enough
# that every split has at least 10 shards (train 82). A stream hands each replica whole shards, so a
# split can feed at most as many replicas as it has shards, and replicas differ by at most one shard
# per epoch (with 8 replicas: 10 or 11 train shards each). 10000 would cap val and test at 2 replicas.
DEFAULT_SHARD_SIZE = 2000
_JPEG_QUALITY = 95
CELEBA_TASKS: tuple[TaskSpec, ...] = tuple(TaskSpec(name, 2) for name in CELEBA_ATTRIBUTES)


def _sample_bytes(path: Path, image_size: int | None, stats: ChannelStats | None) -> bytes:
    """The JPEG bytes to store: the original file, or a resized re-encoding when ``image_size`` is set.

    The image is fully decoded even when its bytes are copied, so a corrupt source JPEG is a DataError
    naming the file here, not a failure in some training run later.
    """
    data = path.read_bytes()
    image = decode_image(data, str(path))
    if image_size is not None:
        image = resize_square(image, image_size)
        data = encode_jpeg(image)
    if stats is not None:
        add_image(stats, image)
    return data


def encode_jpeg(image: Image.Image) -> bytes:
    """The JPEG bytes a resized CelebA image is stored as."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def add_image(stats: ChannelStats, image: Image.Image) -> None:
    """Count an image in the statistics as it is stored, at its stored size.

    Before the JPEG re-encoding: the difference is far below what normalisation cares about.
    """
    stats.add_sample(np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def celeba_manifest(
    entries: dict[str, SplitEntry], stats: ChannelStats, stats_split: str, image_size: int | None
) -> ShardManifest:
    """The manifest of CelebA shards: 40 binary tasks, JPEG inputs of ``image_size`` (None: as they came)."""
    mean, std = stats.mean_std()
    return ShardManifest(
        tasks=CELEBA_TASKS,
        input_key="jpg",
        input_shape=None if image_size is None else (3, image_size, image_size),
        input_dtype="uint8",
        mean=mean,
        std=std,
        stats_split=stats_split,
        splits=entries,
    )


def _write_split(
    index: CelebAIndex,
    split: str,
    staging: Path,
    *,
    image_size: int | None,
    shard_size: int,
    stats: ChannelStats | None,
    progress: bool,
) -> SplitEntry:
    rows = index.split_indices(split)
    labels = index.labels.astype(label_dtype(2))
    writer = SplitWriter(staging, split, shard_size=shard_size, num_tasks=len(CELEBA_TASKS), input_key="jpg")
    for row in tqdm(rows, desc=f"celeba {split}", unit="img", disable=not progress):
        filename = index.filenames[row]
        jpeg = _sample_bytes(index.layout.images_dir / filename, image_size, stats)
        writer.write(Path(filename).stem, jpeg, labels[row])
    return writer.close()


def check_image_size(image_size: object, *, keep: bool = True) -> None:
    """``image_size`` must be an integer >= 1 (or None, keeping the original JPEGs, where ``keep``)."""
    if (image_size is None and keep) or (
        not isinstance(image_size, bool) and isinstance(image_size, int) and image_size >= 1
    ):
        return
    valid = "None (keep the original JPEGs) or an integer >= 1" if keep else "an integer >= 1"
    raise ConfigError(f"image_size: expected {valid}, got {image_size!r}")


def _check_arguments(out_dir: Path, image_size: int | None, shard_size: int, splits: Sequence[str]) -> None:
    check_image_size(image_size)
    check_shard_size(shard_size)
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(CELEBA_SPLITS):
        raise ConfigError(
            f"splits: expected distinct names among {', '.join(CELEBA_SPLITS)}, got {list(splits)}"
        )
    check_output_dir(out_dir)


def convert_celeba(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    splits: Sequence[str] = CELEBA_SPLITS,
    progress: bool = True,
) -> Path:
    """Write ``{split}-%06d.tar`` shards of at most ``shard_size`` samples and return the manifest path.

    ``image_size=None`` copies the original JPEG bytes (manifest ``input.shape`` null: the reader
    resizes); an integer stores square re-encoded images of that size (shape ``[3, s, s]``). Samples
    keep the order of the attribute file. The manifest's normalisation statistics (pixels in [0, 1])
    come from the train split, or from the first of ``splits`` if train is not converted.
    ``progress`` shows a tqdm bar per split on stderr. Arguments are ConfigErrors; an unusable
    output directory, a bad annotation file or an unreadable image is a DataError naming the file,
    and leaves ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    _check_arguments(out_dir, image_size, shard_size, splits)
    index = load_celeba_index(root)
    stats_split = "train" if "train" in splits else splits[0]
    stats = ChannelStats(3, scale=1 / 255)
    with staged_output(out_dir) as staging:
        entries = {
            split: _write_split(
                index,
                split,
                staging,
                image_size=image_size,
                shard_size=shard_size,
                stats=stats if split == stats_split else None,
                progress=progress,
            )
            for split in splits
        }
        write_manifest(staging, celeba_manifest(entries, stats, stats_split, image_size))
    return out_dir / MANIFEST_NAME
