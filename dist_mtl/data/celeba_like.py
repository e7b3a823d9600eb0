"""CelebA-like shards, generated fast: for benchmarks and tests of the stream at a realistic scale.

What ``convert_celeba(make_celeba_miniature(..., image_width=178, image_height=218), image_size=s)``
would produce, without its slow part. The miniature draws labels and the coarse grid of each image,
upsamples it to a 178 x 218 JPEG file, and the converter decodes that and downsamples it to s x s:
about 3.5 ms an image, a minute for 20,000. Here the same draws (same labels, same coarse grids for
a given seed) are resized straight to s x s: about 1 ms an image. The shards, manifest, keys, label
encoding, normalisation and splits (80/10/10) are those of the converter, through the same writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dist_mtl.data.celeba_convert import (
    DEFAULT_SHARD_SIZE,
    add_image,
    celeba_manifest,
    check_image_size,
    encode_jpeg,
)
from dist_mtl.data.celeba_layout import CELEBA_SPLITS
from dist_mtl.data.celeba_miniature import partition_sizes, random_attributes, smooth_image
from dist_mtl.data.manifest import MANIFEST_NAME, SplitEntry, write_manifest
from dist_mtl.data.shard_writer import (
    ChannelStats,
    SplitWriter,
    check_output_dir,
    check_shard_size,
    staged_output,
)
from dist_mtl.errors import ConfigError

SOURCE_WIDTH, SOURCE_HEIGHT = 178, 218  # the aligned CelebA images


def make_celeba_like_shards(
    out_dir: str | os.PathLike[str],
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
) -> Path:
    """Write ``num_images`` CelebA-like samples as train/val/test shards; return the manifest path.

    Samples are 40 binary attributes (each with its own random rate) and a JPEG of ``image_size``
    squared of smooth random content; keys ``000001`` ... in order, train first. The output appears
    atomically, as a conversion's does.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 3:
        raise ConfigError(f"num_images: expected an integer >= 3 (one per split), got {num_images!r}")
    check_image_size(image_size, keep=False)
    check_shard_size(shard_size)
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    rng = np.random.default_rng(seed)
    labels = (random_attributes(rng, num_images) > 0).astype(np.int8)
    stats = ChannelStats(3, scale=1 / 255)
    entries: dict[str, SplitEntry] = {}
    row = 0
    with staged_output(out_dir) as staging:
        for split, count in zip(CELEBA_SPLITS, partition_sizes(num_images), strict=True):
            writer = SplitWriter(
                staging, split, shard_size=shard_size, num_tasks=labels.shape[1], input_key="jpg"
            )
            for _ in tqdm(range(count), desc=f"celeba-like {split}", unit="img", disable=not progress):
                image = smooth_image(rng, SOURCE_WIDTH, SOURCE_HEIGHT, size=(image_size, image_size))
                if split == "train":
                    add_image(stats, image)
                writer.write(f"{row + 1:06d}", encode_jpeg(image), labels[row])
                row += 1
            entries[split] = writer.close()
        write_manifest(staging, celeba_manifest(entries, stats, "train", image_size))
    return out_dir / MANIFEST_NAME
