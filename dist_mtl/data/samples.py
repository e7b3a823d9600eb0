"""Decode one sample of a shard directory (input and labels) and check it against the manifest.

Every failure is a DataError naming the shard, the sample key and what would be valid, so that with
``data.on_error=raise`` a bad sample stops the run at a readable message, and with ``skip`` the
stream can mask exactly that sample (see ``stream``). Decoding is deterministic: the same bytes give
the same array in any process, which is what makes the stream's output independent of its workers.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from dist_mtl.data.base import TaskSpec
from dist_mtl.data.images import IMAGE_CHANNELS, decode_image, square_uint8_chw
from dist_mtl.data.manifest import LABEL_KEY, MANIFEST_NAME, ShardManifest
from dist_mtl.errors import DataError

_NPY_ERRORS = (ValueError, OSError, EOFError)  # what np.load raises for bytes that are not a .npy array
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # -> dtype, shape, fortran order


def _npy_header(data: bytes) -> tuple[int, np.dtype, tuple[int, ...], bool] | None:
    """(body offset, dtype, shape, fortran order) of a version 1 or 2 .npy header, parsed once per process.

    np.load parses the header with ``ast.literal_eval`` (about 0.2 ms, more than decoding a small
    JPEG); the samples of a data set share one or two distinct headers, so each is parsed once.
    None for anything else (np.load then decides, and names the problem).
    """
    if data[:6] != _NPY_MAGIC or data[6:8] not in (b"\x01\x00", b"\x02\x00") or len(data) < 12:
        return None
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = data[:end]
    if header not in _NPY_HEADERS:
        stream = io.BytesIO(header)
        np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if data[6] == 1 else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, dtype = read(stream)
        except _NPY_ERRORS:
            return None
        if dtype.hasobject or len(_NPY_HEADERS) >= 64:
            return None
        _NPY_HEADERS[header] = (dtype, shape, fortran)
    dtype, shape, fortran = _NPY_HEADERS[header]
    return end, dtype, shape, fortran


def _load_npy(data: bytes, what: str) -> np.ndarray:
    """``np.load(allow_pickle=False)`` of ``data``, with the header parse cached (``_npy_header``).

    The body must hold exactly the bytes the header announces. The result may be read-only.
    """
    if data[:6] != _NPY_MAGIC:  # np.load would try it as a pickle and say so
        raise DataError(f"{what}: not a .npy array (it does not start with the .npy magic bytes)")
    parsed = _npy_header(data)
    if parsed is None:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except _NPY_ERRORS as exc:
            raise DataError(f"{what}: not a .npy array ({exc})") from None
    start, dtype, shape, fortran = parsed
    expected = dtype.itemsize * math.prod(shape)
    if len(data) - start != expected:
        raise DataError(
            f"{what}: not a .npy array ({len(data) - start} data bytes, its header says {expected})"
        )
    body = np.frombuffer(data, dtype=dtype, offset=start, count=math.prod(shape))
    return body.reshape(shape, order="F" if fortran else "C")


@dataclass(frozen=True)
class SampleDecoder:
    """Turns the input and label bytes of a sample into (x, y) as the stream delivers them.

    x: uint8 (C, S, S) for encoded images (resized to ``image_size`` unless already that size),
    the stored array for ``npy`` (exactly ``input.shape`` and ``input.dtype``, finite if float32);
    y: int64 (T,) with values in [-1, classes_t).
    """

    tasks: tuple[TaskSpec, ...]
    input_key: str
    shape: tuple[int, int, int]  # of x as delivered
    dtype: str  # of x as delivered: "uint8" or "float32"

    @classmethod
    def for_manifest(cls, manifest: ShardManifest, image_size: int, where: str) -> SampleDecoder:
        """The decoder of ``manifest``'s samples; ``where`` (the manifest path) names unsupported inputs."""
        if manifest.input_key == "npy":
            assert manifest.input_shape is not None  # read_manifest requires a shape for arrays
            c, h, w = manifest.input_shape
            return cls(manifest.tasks, "npy", (c, h, w), manifest.input_dtype)
        channels = manifest.channels
        if channels not in IMAGE_CHANNELS:
            raise DataError(
                f"{where}: input.shape: {manifest.input_key} images are read with "
                f"{' / '.join(map(str, IMAGE_CHANNELS))} channels, got {channels}"
            )
        return cls(manifest.tasks, manifest.input_key, (channels, image_size, image_size), "uint8")

    @property
    def fields(self) -> tuple[str, str]:
        """The member fields a sample must hold: its input and its labels."""
        return (self.input_key, LABEL_KEY)

    def decode(self, data: list[bytes | None], where: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) from the bytes of ``fields`` (None: member absent); ``where`` is "shard: sample 'key'"."""
        missing = [f for f, d in zip(self.fields, data, strict=True) if d is None]
        if missing:
            raise DataError(
                f"{where}: no {' or '.join(missing)} member; every sample needs {' and '.join(self.fields)}"
                f" as {MANIFEST_NAME} says, convert again"
            )
        raw_x, raw_y = data
        assert raw_x is not None and raw_y is not None
        return self._input(raw_x, f"{where}: {self.input_key}"), self._labels(raw_y, f"{where}: {LABEL_KEY}")

    def _input(self, data: bytes, what: str) -> np.ndarray:
        if self.input_key != "npy":
            return square_uint8_chw(decode_image(data, what), self.shape[1], self.shape[0])
        array = _load_npy(data, what)
        if array.shape != self.shape or array.dtype != np.dtype(self.dtype):
            raise DataError(
                f"{what}: expected a {self.dtype} array of shape {list(self.shape)} (the manifest's "
                f"input.shape and input.dtype), got {array.dtype.str} {list(array.shape)}"
            )
        if self.dtype == "float32" and not np.isfinite(array).all():
            raise DataError(f"{what}: holds NaN or infinite values; inputs must be finite")
        return np.ascontiguousarray(array)

    def _labels(self, data: bytes, what: str) -> np.ndarray:
        labels = _load_npy(data, what)
        width = len(self.tasks)
        if labels.shape != (width,) or labels.dtype.kind not in "iu":
            raise DataError(
                f"{what}: expected {width} integer labels (one per task, -1 = no label), "
                f"got {labels.dtype.str} {list(labels.shape)}"
            )
        labels = labels.astype(np.int64)
        classes = np.fromiter((t.num_classes for t in self.tasks), dtype=np.int64, count=width)
        bad = np.flatnonzero((labels < -1) | (labels >= classes))
        if bad.size:
            task = self.tasks[bad[0]]
            raise DataError(
                f"{what}: task {task.name!r} has label {labels[bad[0]]}; valid: -1 (no label) "
                f"to {task.num_classes - 1}"
            )
        return labels
