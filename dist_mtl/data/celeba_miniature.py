"""A faithful miniature of a local CelebA copy (tests and demos; the real data is never shipped).

Same files, names and formats as the official layout (or torchvision's flat one): numbered JPEGs,
the attribute file with the real 40 names and right-aligned -1/1 columns, and a partition file with
train images first, then val, then test (about 80/10/10, at least one image in each).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dist_mtl.data.celeba_layout import CELEBA_ATTRIBUTES, CELEBA_LAYOUTS


def partition_sizes(num_images: int) -> tuple[int, int, int]:
    """Train / val / test image counts: about 80/10/10, at least one in each."""
    val = max(1, round(0.1 * num_images))
    test = max(1, round(0.1 * num_images))
    return num_images - val - test, val, test


def random_attributes(rng: np.random.Generator, num_images: int) -> np.ndarray:
    """int8 (N, 40) labels in {-1, 1}, each attribute with its own random rate in [0.1, 0.9]."""
    rates = rng.uniform(0.1, 0.9, size=len(CELEBA_ATTRIBUTES))
    return np.where(rng.random((num_images, len(CELEBA_ATTRIBUTES))) < rates, 1, -1).astype(np.int8)


def smooth_image(
    rng: np.random.Generator, width: int, height: int, size: tuple[int, int] | None = None
) -> Image.Image:
    """Random RGB content of a ``width`` x ``height`` image, smooth over about 4 pixels.

    Drawn as a coarse grid of random colours resized bilinearly, to ``(width, height)`` or straight
    to ``size``: the same draws give the same content either way, without the large intermediate.
    """
    coarse = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size or (width, height), Image.Resampling.BILINEAR)


def make_celeba_miniature(
    root: str | os.PathLike[str],
    *,
    num_images: int = 30,
    seed: int = 0,
    layout: str = "official",
    image_width: int = 36,
    image_height: int = 44,
) -> Path:
    """Write ``num_images`` random smooth JPEGs plus annotation files under ``root``; return ``root``.

    ``layout`` is "official" (``Img/``, ``Anno/``, ``Eval/``) or "torchvision" (``celeba/``). The
    default image size keeps the 178 x 218 aspect ratio of the aligned images.
    """
    paths = {kind: rest for kind, *rest in CELEBA_LAYOUTS}
    if layout not in paths:
        raise ValueError(f"layout: expected one of {', '.join(paths)}, got {layout!r}")
    if num_images < 3:
        raise ValueError(f"num_images: expected at least 3 (one per split), got {num_images}")
    root = Path(root)
    images_dir, attr_file, partition_file = (root / p for p in paths[layout])
    for directory in (images_dir, attr_file.parent, partition_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    signs = random_attributes(rng, num_images)
    names = [f"{i:06d}.jpg" for i in range(1, num_images + 1)]
    for name in names:
        smooth_image(rng, image_width, image_height).save(images_dir / name, format="JPEG", quality=90)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, signs, strict=True)]
    attr_file.write_text(f"{num_images}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    sizes = partition_sizes(num_images)
    codes = np.repeat(np.arange(3), sizes)
    partition_file.write_text("".join(f"{name} {code}\n" for name, code in zip(names, codes, strict=True)))
    return root
