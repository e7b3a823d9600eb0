"""What every converter into the ``dist_mtl-shards/1`` format shares, implemented once.

The output directory appears atomically (``staged_output``: a temporary sibling directory renamed onto
it when complete), so a reader never sees half a conversion and a failed one leaves the earlier output
as it was. ``SplitWriter`` writes one split's ``{split}-%06d.tar`` shards and records what the manifest
lists about them (sample counts, byte sizes, per-task labelled counts). ``ChannelStats`` accumulates
the per-channel normalisation statistics in float64, chunk by chunk, so a data set larger than memory
can be measured.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds

from dist_mtl.data.manifest import LABEL_KEY, MANIFEST_NAME, SHARD_PATTERN, ShardEntry, SplitEntry
from dist_mtl.errors import ConfigError, DataError


def check_shard_size(shard_size: object, name: str = "shard_size") -> int:
    """``shard_size`` as given when it is an integer >= 1; anything else is a ConfigError."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {shard_size!r}")
    return shard_size


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output that is a file, or a non-empty directory that is not an earlier conversion.

    Replacing an earlier conversion (a directory holding ``manifest.json``) is allowed; replacing a
    directory of something else would delete the user's files.
    """
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


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to ``out_dir``; it becomes ``out_dir`` when the block ends.

    If the block raises (bad data found half way, Ctrl-C), the staging directory is removed and
    ``out_dir`` is left as it was: absent, or the earlier conversion.
    """
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published directory should be readable as usual
    try:
        yield staging
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def label_dtype(classes: int) -> np.dtype:
    """The smallest signed integer type holding every label in [-1, classes): int8 for binary tasks."""
    for dtype in (np.int8, np.int16, np.int32):
        if classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


@functools.lru_cache(maxsize=32)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """What ``np.save`` writes before the data of a C-order array of this shape and dtype."""
    empty = np.zeros(shape, dtype=np.dtype(dtype))
    buffer = io.BytesIO()
    np.save(buffer, empty, allow_pickle=False)
    return buffer.getvalue()[: buffer.tell() - empty.nbytes]


def encode_npy(array: np.ndarray) -> bytes:
    """The ``.npy`` file bytes of ``array`` (C order, no pickle): the bytes ``np.save`` writes.

    The header is computed once per shape and dtype: ``np.save`` per sample would spend more time on
    it than on the data when samples are small.
    """
    array = np.ascontiguousarray(array)
    return _npy_header(array.shape, array.dtype.str) + array.tobytes()


class SplitWriter:
    """Writes one split as ``{split}-%06d.tar`` shards of at most ``shard_size`` samples.

    Each sample holds its input under ``input_key`` (bytes as given) and its labels as ``cls.npy``.
    ``close`` returns the split's manifest entry: shard names, counts and byte sizes (measured on the
    closed files, so the manifest can catch a later truncation) and per-task labelled counts.
    """

    def __init__(self, directory: Path, split: str, *, shard_size: int, num_tasks: int, input_key: str):
        self.directory = directory
        self.split = split
        self.shard_size = check_shard_size(shard_size)
        self.input_key = input_key
        self.labelled = np.zeros(num_tasks, dtype=np.int64)
        self.entries: list[ShardEntry] = []
        self._writer: wds.TarWriter | None = None
        self._name = ""
        self._count = 0

    def write(self, key: str, data: bytes, labels: np.ndarray) -> None:
        """Add one sample; ``labels`` is its integer vector of one label per task, -1 = no label."""
        if labels.shape != self.labelled.shape:
            raise ValueError(
                f"labels of sample {key!r}: expected shape {self.labelled.shape}, got {labels.shape}"
            )
        if self._writer is None:
            self._name = SHARD_PATTERN.format(split=self.split) % len(self.entries)
            # encoder=False: the bytes are stored as they are, nothing is re-encoded by webdataset.
            self._writer = wds.TarWriter(str(self.directory / self._name), encoder=False, mtime=0.0)
        self._writer.write({"__key__": key, self.input_key: data, LABEL_KEY: encode_npy(labels)})
        self.labelled += labels >= 0
        self._count += 1
        if self._count == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        size = (self.directory / self._name).stat().st_size
        self.entries.append(ShardEntry(self._name, self._count, size))
        self._count = 0

    def close(self) -> SplitEntry:
        """Finish the last shard; the split's manifest entry."""
        self._close_shard()
        return SplitEntry(tuple(self.entries), tuple(int(n) for n in self.labelled))


class ChannelStats:
    """Per-channel mean and standard deviation over batches of (N, C, ...) arrays, in float64.

    Batches are combined with Chan et al.'s parallel update (count, mean, sum of squared deviations),
    which stays accurate for float inputs whose mean is large compared with their spread, where
    "mean of squares minus square of mean" would cancel. ``scale`` multiplies the values first
    (1/255 for uint8 images, so the statistics are of pixels in [0, 1]).
    """

    def __init__(self, channels: int, scale: float = 1.0) -> None:
        self.scale = scale
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self._pending: list[np.ndarray] = []

    def add_sample(self, sample: np.ndarray) -> None:
        """Add one (C, ...) sample, of any size. Buffered: a few numpy calls per image would cost
        more than decoding a small one, so samples are added 256 at a time."""
        self._pending.append(sample.reshape(len(self.mean), -1))
        if len(self._pending) == 256:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.add(np.concatenate(self._pending, axis=1)[None])
            self._pending = []

    def add(self, batch: np.ndarray) -> None:
        """Add a batch of shape (N, C, ...) (N may be 0)."""
        values = np.asarray(batch, dtype=np.float64)
        values = np.moveaxis(values, 1, 0).reshape(len(self.mean), -1)
        n = values.shape[1]
        if n == 0:
            return
        if self.scale != 1.0:
            values = values * self.scale
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and (population) standard deviation per channel.

        A channel that never varies (or no data at all) gets std 1, so normalising only shifts it
        instead of dividing by zero (a manifest's std must be positive). "Never varies" allows for the
        rounding of the float64 sums: a spread below 1e-12 of the mean's magnitude is none.
        """
        self._flush()
        if self.count == 0:
            return tuple(0.0 for _ in self.mean), tuple(1.0 for _ in self.mean)
        std = np.sqrt(np.maximum(self.m2 / self.count, 0.0))
        std = np.where(std > 1e-12 * np.abs(self.mean), std, 1.0)
        return tuple(self.mean.tolist()), tuple(std.tolist())
