"""Convert a local CelebA copy into webdataset tar shards per split plus ``manifest.json``.

The output directory appears atomically: everything is written to a temporary sibling directory,
which is renamed onto ``out_dir`` only when complete, so a reader never sees half a conversion.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dist_mtl.data.celeba_layout import CELEBA_ATTRIBUTES, CELEBA_SPLITS, CelebAIndex, load_celeba_index
from dist_mtl.data.celeba_manifest import (
    IMAGE_KEY,
    LABEL_KEY,
    MANIFEST_NAME,
    SHARD_PATTERN,
    CelebAManifest,
    ShardEntry,
    write_manifest,
)
from dist_mtl.data.images import decode_image, resize_square, to_chw
from dist_mtl.errors import ConfigError, DataError

# Samples per shard, for the function and the command line alike. CelebA has 162,770 / 19,867 /
# 19,962 train / val / test images. A tar sample takes about 11 KB with the original 178 x 218 JPEGs
# (7 KB on average, plus about 3.5 KB of tar headers for its two members) and about 6-7 KB at 64 x 64,
# so shards are roughly 20 MB (13 MB resized): large enough that reading is sequential, small enough
# that every split has at least 10 shards (train 82). A stream hands each replica whole shards, so a
# split can feed at most as many replicas as it has shards, and replicas differ by at most one shard
# per epoch (with 8 replicas: 10 or 11 train shards each). 10000 would cap val and test at 2 replicas.
DEFAULT_SHARD_SIZE = 2000
_JPEG_QUALITY = 95


class _ChannelStats:
    """Running per-channel sums for the normalisation statistics written to the manifest."""

    def __init__(self) -> None:
        self.total = np.zeros(3)
        self.squares = np.zeros(3)
        self.pixels = 0

    def add(self, image: Image.Image) -> None:
        chw = to_chw(image).reshape(3, -1).astype(np.float64)
        self.total += chw.sum(axis=1)
        self.squares += (chw**2).sum(axis=1)
        self.pixels += chw.shape[1]

    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        if self.pixels == 0:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        mean = self.total / self.pixels
        std = np.sqrt(np.maximum(self.squares / self.pixels - mean**2, 1e-12))
        return tuple(mean.tolist()), tuple(std.tolist())


def _sample_bytes(path: Path, image_size: int | None, stats: _ChannelStats | None) -> bytes:
    """The JPEG bytes to store: the original file, or a resized re-encoding when ``image_size`` is set.

    The image is fully decoded even when its bytes are copied, so a corrupt source JPEG is a DataError
    naming the file here, not a failure in some training run later.
    """
    data = path.read_bytes()
    image = decode_image(data, str(path))
    if image_size is not None:
        image = resize_square(image, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        data = buffer.getvalue()
    if stats is not None:
        stats.add(image)
    return data


def _write_split(
    index: CelebAIndex,
    split: str,
    staging: Path,
    *,
    image_size: int | None,
    shard_size: int,
    stats: _ChannelStats | None,
    progress: bool,
) -> tuple[ShardEntry, ...]:
    rows = index.split_indices(split)
    entries = []
    bar = tqdm(total=len(rows), desc=f"celeba {split}", unit="img", disable=not progress)
    for shard in range(math.ceil(len(rows) / shard_size)):
        name = SHARD_PATTERN.format(split=split) % shard
        chunk = rows[shard * shard_size : (shard + 1) * shard_size]
        with wds.TarWriter(str(staging / name), mtime=0.0) as writer:
            for row in chunk:
                filename = index.filenames[row]
                jpeg = _sample_bytes(index.layout.images_dir / filename, image_size, stats)
                writer.write({"__key__": Path(filename).stem, IMAGE_KEY: jpeg, LABEL_KEY: index.labels[row]})
                bar.update()
        entries.append(ShardEntry(name, len(chunk)))
    bar.close()
    return tuple(entries)


def _check_arguments(out_dir: Path, image_size: int | None, shard_size: int, splits: Sequence[str]) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(
            f"image_size: expected None (keep the original JPEGs) or an integer >= 1, got {image_size!r}"
        )
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size: expected an integer >= 1, got {shard_size!r}")
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(CELEBA_SPLITS):
        raise ConfigError(
            f"splits: expected distinct names among {', '.join(CELEBA_SPLITS)}, got {list(splits)}"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir}: output exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise DataError(
                f"{out_dir}: not empty and holds no {MANIFEST_NAME}; refusing to replace it, choose another"
            )


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory onto ``out_dir`` (replacing an earlier conversion)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, retired / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except OSError:
        os.rename(retired / out_dir.name, out_dir)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


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

    ``image_size=None`` copies the original JPEG bytes; an integer stores square re-encoded images of
    that size. Samples keep the order of the attribute file. The manifest's normalisation statistics
    come from the train split, or from the first of ``splits`` if train is not converted.
    ``progress`` shows a tqdm bar per split on stderr. Arguments are ConfigErrors; an unusable
    output directory, a bad annotation file or an unreadable image is a DataError naming the file,
    and leaves ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    _check_arguments(out_dir, image_size, shard_size, splits)
    index = load_celeba_index(root)
    stats_split = "train" if "train" in splits else splits[0]
    stats = _ChannelStats()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published directory should be readable as usual
    try:
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
        mean, std = stats.mean_std()
        write_manifest(
            staging, CelebAManifest(CELEBA_ATTRIBUTES, image_size, mean, std, stats_split, entries)
        )
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / MANIFEST_NAME
