"""Image handling shared by the CelebA converter and reader, so both resize the same way."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dist_mtl.errors import DataError

# What PIL raises for bytes that are not a complete image: unknown format (UnidentifiedImageError, an
# OSError), truncated data (OSError), broken headers (SyntaxError, ValueError, EOFError), bombs.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_image(data: bytes, what: str) -> Image.Image:
    """Fully decode ``data`` (not just its header: PIL opens lazily); a DataError names ``what``.

    Used by the converter on source JPEGs and by the reader on shard samples, so a corrupt image is
    reported the same way, naming the file (or shard and key) instead of ending in a PIL traceback.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except _DECODE_ERRORS as exc:
        raise DataError(f"{what}: not a readable image ({exc})") from None
    return image


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """RGB image of ``size`` x ``size`` (bilinear; the 178 x 218 aspect ratio is not kept)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def to_chw(image: Image.Image) -> np.ndarray:
    """float32 (3, H, W) array in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channel count -> PIL mode the stream reader decodes to
IMAGE_CHANNELS: tuple[int, ...] = tuple(_MODES)


def square_uint8_chw(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """uint8 (channels, size, size) array: converted to L/RGB/RGBA, resized bilinearly if not square ``size``.

    The stream reader's decode: uint8 is what crosses the DataLoader queue (a quarter of float32),
    and the resize is ``resize_square``'s (bilinear, aspect ratio not kept), so a stored image of
    another size reads as the converter would have resized it.
    """
    image = image.convert(_MODES[channels])
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
