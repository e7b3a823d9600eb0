"""Image handling shared by the CelebA converter and reader, so both resize the same way."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """RGB image of ``size`` x ``size`` (bilinear; the 178 x 218 aspect ratio is not kept)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def to_chw(image: Image.Image) -> np.ndarray:
    """float32 (3, H, W) array in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
