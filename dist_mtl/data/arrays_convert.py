"""Convert your own arrays (inputs .npy, labels .npz or .csv) into ``dist_mtl-shards/1`` shards.

Inputs: one ``.npy`` array of shape (N, C, H, W), or (N, H, W) for one channel (stored as (1, H, W)),
dtype uint8 or float32. It is memory-mapped and read in chunks, so it may be larger than memory; each
sample is stored as the ``.npy`` bytes of its (C, H, W) array, values exactly as given (no lossy
re-encoding). Float inputs must be finite.

Labels: one integer per sample and task, -1 meaning "no label for this task" (masked out of that
task's loss). Either an ``.npz`` with one 1-D array of N labels per task (task name = array name, in
the order stored: ``np.savez(path, **{"smiling": y0, "age": y1})``), or a ``.csv`` with a header line
of task names and one row per sample (an empty cell is -1; blank lines are skipped). A task has
``max label + 1`` classes (at least 2), over every label file of the conversion.

Splits: "train" and "test", the test set either from separate files (same task names) or a seeded
random fraction of the rows; optionally "val", a seeded random fraction of the rows too. The
normalisation statistics are measured on the train split.

Everything that can be checked before writing is (labels, shapes, dtypes, finiteness, a task without
labels in a split), so bad input fails fast; either way the output appears atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dist_mtl.data.base import TaskSpec
from dist_mtl.data.manifest import MANIFEST_NAME, MISSING_LABEL, ShardManifest, SplitEntry, write_manifest
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.data.shard_writer import (
    ChannelStats,
    SplitWriter,
    check_output_dir,
    check_shard_size,
    encode_npy,
    label_dtype,
    staged_output,
)
from dist_mtl.errors import ConfigError, DataError

# Default shards: about DEFAULT_SHARD_BYTES each (tens of MB: sequential reads, few files), but at
# least MIN_SHARDS per split, because a stream hands each replica whole shards: a split of fewer
# shards than replicas cannot be read, and with few shards replicas get uneven shares. A split of
# under MIN_SHARDS x 32 MB therefore gets MIN_SHARDS smaller shards. --shard-size sets one count for all.
DEFAULT_SHARD_BYTES = 32 * 2**20
MIN_SHARDS = 16
INPUT_DTYPES = ("uint8", "float32")
_CHUNK_VALUES = 2**21  # values read (and, for statistics, held as float64: 16 MB) at a time
_TAR_OVERHEAD = 3 * 512  # a tar header per member (input, labels) plus the padded labels member


@dataclass(frozen=True)
class InputArray:
    """A memory-mapped input file: (N, C, H, W) samples, or (N, H, W) read as (N, 1, H, W)."""

    path: Path
    array: np.ndarray

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.array.ndim == 3:
            return (1, int(self.array.shape[1]), int(self.array.shape[2]))
        channels, height, width = (int(n) for n in self.array.shape[1:])
        return channels, height, width

    @property
    def dtype(self) -> np.dtype:
        """The native-byte-order dtype samples are stored with (uint8 or float32)."""
        return np.dtype(self.array.dtype.name)

    @property
    def chunk_rows(self) -> int:
        return max(1, _CHUNK_VALUES // math.prod(self.sample_shape))

    def read(self, rows: np.ndarray | slice) -> np.ndarray:
        """Samples ``rows`` as an in-memory (n, C, H, W) array of the native dtype."""
        block = np.asarray(self.array[rows]).astype(self.dtype, copy=False)
        return block.reshape(len(block), *self.sample_shape)


@dataclass(frozen=True)
class LabelTable:
    """The labels of one file: task names in file order and an int64 (N, T) array, -1 = no label."""

    path: Path
    names: tuple[str, ...]
    values: np.ndarray


@dataclass(frozen=True)
class _Split:
    name: str
    source: InputArray
    rows: np.ndarray  # sorted row indices into source
    labels: np.ndarray  # int64 (len(rows), T)
    labels_path: Path


def load_inputs(path: str | os.PathLike[str]) -> InputArray:
    """Memory-map an inputs ``.npy`` and check its shape and dtype; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: inputs file missing (expected a .npy array)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise DataError(f"{path}: an .npz archive; inputs must be one .npy array of shape (N, C, H, W)")
    if array.dtype.fields is not None or array.dtype.name not in INPUT_DTYPES:
        raise DataError(f"{path}: dtype {array.dtype}; inputs must be {' or '.join(INPUT_DTYPES)}")
    if array.ndim not in (3, 4) or 0 in array.shape:
        raise DataError(
            f"{path}: shape {tuple(array.shape)}; expected (N, C, H, W), or (N, H, W) for one channel, "
            "with no zero dimension"
        )
    return InputArray(path, array)


def _integer_labels(values: np.ndarray, where: str, count: int, inputs: Path) -> np.ndarray:
    """One task's labels from an .npz as int64; ``where`` ("FILE: task 'x'") prefixes every error."""
    if values.ndim != 1:
        raise DataError(f"{where}: expected a 1-D array of {count} labels, got shape {values.shape}")
    if len(values) != count:
        raise DataError(f"{where}: {len(values)} labels but {inputs} holds {count} samples")
    if values.dtype.kind == "b":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = ~(np.isfinite(values) & (values == np.round(values)))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{where}, index {i}: expected an integer >= -1 (-1: no label), got {values[i].item()!r}"
            )
    elif values.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer labels, got dtype {values.dtype}")
    elif values.dtype.kind == "u" and len(values) and values.max() > np.iinfo(np.int64).max:
        i = int(np.argmax(values > np.iinfo(np.int64).max))
        raise DataError(f"{where}, index {i}: label {values[i].item()} is too large")
    labels = values.astype(np.int64)
    if (labels < MISSING_LABEL).any():
        i = int(np.argmax(labels < MISSING_LABEL))
        raise DataError(f"{where}, index {i}: expected an integer >= -1 (-1: no label), got {labels[i]}")
    return labels


def _load_npz(path: Path, count: int, inputs: Path) -> LabelTable:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array; expected an .npz archive with one label array per task")
    with archive:
        names = tuple(archive.files)
        if not names:
            raise DataError(f"{path}: holds no arrays; expected one integer label array per task")
        _check_names(path, names, "array")
        columns = []
        for name in names:
            where = f"{path}: task {name!r}"
            try:
                values = archive[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{where}: not a readable array ({exc})") from None
            columns.append(_integer_labels(values, where, count, inputs))
    return LabelTable(path, names, np.stack(columns, axis=1))


def _check_names(path: Path, names: tuple[str, ...], what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(
                f"{path}: task name {name!r} appears twice ({what}s {seen[name]} and {i}); "
                "task names must be distinct"
            )
        seen[name] = i


def _csv_cell(path: Path, line: int, name: str, cell: str) -> int:
    """One CSV cell as a label: an integer (also written "2.0"), or -1 for an empty cell."""
    text = cell.strip()
    if not text:
        return MISSING_LABEL
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer():
        return int(number)
    raise DataError(
        f"{path}: line {line}, column {name!r}: expected an integer >= -1 or an empty cell (no label), "
        f"got {cell!r}"
    )


def _load_csv(path: Path, count: int, inputs: Path) -> LabelTable:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DataError(f"{path}: line 1: expected a header of task names (comma-separated), got none")
        names = tuple(cell.strip() for cell in header)
        if "" in names:
            raise DataError(f"{path}: line 1, column {names.index('') + 1}: empty task name")
        _check_names(path, names, "column")
        values = np.full((count, len(names)), MISSING_LABEL, dtype=np.int64)
        lines = np.zeros(count, dtype=np.int64)
        n = 0
        for row in reader:
            if not row:
                continue  # a blank line
            line = reader.line_num
            if len(row) != len(names):
                raise DataError(
                    f"{path}: line {line}: expected {len(names)} cells (one per task: {', '.join(names)}), "
                    f"got {len(row)}"
                )
            if n == count:
                raise DataError(f"{path}: line {line}: more label rows than the {count} samples of {inputs}")
            try:
                values[n] = [int(cell) if cell.strip() else MISSING_LABEL for cell in row]
            except (ValueError, OverflowError):
                values[n] = [_csv_cell(path, line, name, cell) for name, cell in zip(names, row, strict=True)]
            lines[n] = line
            n += 1
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    if n != count:
        raise DataError(
            f"{path}: {n} label rows but {inputs} holds {count} samples (blank lines are skipped; "
            "write -1 for a missing label in a one-column file)"
        )
    bad = values < MISSING_LABEL
    if bad.any():
        row, column = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise DataError(
            f"{path}: line {lines[row]}, column {names[column]!r}: expected an integer >= -1 "
            f"(-1 or empty: no label), got {values[row, column]}"
        )
    return LabelTable(path, names, values)


def load_labels(path: str | os.PathLike[str], inputs: InputArray) -> LabelTable:
    """Labels for the samples of ``inputs`` from an ``.npz`` or ``.csv``; errors name file and position."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DataError(
            f"{path}: labels must be an .npz (one array per task) or a .csv (header of task names)"
        )
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: labels file missing")
    load = _load_npz if suffix == ".npz" else _load_csv
    return load(path, inputs.count, inputs.path)


def _check_fraction(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{name}: expected a number in (0, 1), got {value!r}")
    return float(value)


def _check_arguments(
    test_inputs: object, test_labels: object, test_fraction: object, val_fraction: object, seed: object
) -> tuple[float | None, float | None]:
    test = _check_fraction("test_fraction", test_fraction)
    val = _check_fraction("val_fraction", val_fraction)
    if (test_inputs is None) != (test_labels is None):
        raise ConfigError("test_inputs and test_labels: give both (the test set's inputs and its labels)")
    if test_inputs is not None and test is not None:
        raise ConfigError("test_fraction: give either test_inputs/test_labels or test_fraction, not both")
    if test_inputs is None and test is None:
        raise ConfigError(
            "test_inputs/test_labels or test_fraction: one is needed, a separate test set or the fraction "
            "of the rows to hold out for testing"
        )
    if (test or 0) + (val or 0) >= 1:
        raise ConfigError(f"test_fraction + val_fraction: expected less than 1, got {test} + {val}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    return test, val


def _align_tasks(train: LabelTable, test: LabelTable) -> LabelTable:
    """``test`` with its columns in the order of ``train``'s tasks; the names must be the same."""
    if set(test.names) != set(train.names):
        missing = [n for n in train.names if n not in test.names]
        extra = [n for n in test.names if n not in train.names]
        raise DataError(
            f"{test.path}: tasks differ from those of {train.path}: missing {missing}, extra {extra}; "
            "the test labels need the same task names"
        )
    order = [test.names.index(name) for name in train.names]
    return LabelTable(test.path, train.names, test.values[:, order])


def _plan_splits(
    inputs: InputArray,
    labels: LabelTable,
    test: tuple[InputArray, LabelTable] | None,
    fractions: dict[str, float | None],
    seed: int,
) -> list[_Split]:
    """train / val / test row sets: seeded random fractions of ``inputs``' rows, or the test files."""
    order = np.random.default_rng(seed).permutation(inputs.count)
    taken: dict[str, np.ndarray] = {}
    start = 0
    for name in ("test", "val"):
        fraction = fractions[name]
        if fraction is None:
            continue
        n = round(fraction * inputs.count)
        if n < 1:
            raise ConfigError(
                f"{name}_fraction: {fraction} of the {inputs.count} samples of {inputs.path} leaves "
                f"split {name!r} empty; use a larger fraction"
            )
        taken[name] = np.sort(order[start : start + n])
        start += n
    if start >= inputs.count:
        raise ConfigError(
            f"test_fraction/val_fraction: they take all {inputs.count} samples of {inputs.path}, none "
            "is left for split 'train'"
        )
    taken["train"] = np.sort(order[start:])
    splits = [
        _Split(n, inputs, taken[n], labels.values[taken[n]], labels.path)
        for n in ("train", "val", "test")
        if n in taken
    ]
    if test is not None:
        source, table = test
        splits.append(_Split("test", source, np.arange(source.count), table.values, table.path))
    return splits


def _check_labelled(splits: list[_Split], names: tuple[str, ...]) -> None:
    for split in splits:
        counts = (split.labels >= 0).sum(axis=0)
        for name, n in zip(names, counts, strict=True):
            if n == 0:
                raise DataError(
                    f"{split.labels_path}: task {name!r} has no labelled sample in split {split.name!r} "
                    f"(all {len(split.rows)} are -1): nothing could train or evaluate it there; label some "
                    "samples or drop the task"
                )


def _scan(
    source: InputArray, stats: ChannelStats | None, stats_rows: np.ndarray | None, progress: bool
) -> None:
    """One chunked pass over ``source``: float samples must be finite; statistics of ``stats_rows``."""
    floats = source.dtype == np.float32
    if not floats and stats is None:
        return
    member = None
    if stats_rows is not None:
        member = np.zeros(source.count, dtype=bool)
        member[stats_rows] = True
    step = source.chunk_rows
    bar = tqdm(total=source.count, desc=f"checking {source.path.name}", unit="sample", disable=not progress)
    for start in range(0, source.count, step):
        block = source.read(slice(start, start + step))
        if floats:
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if not finite.all():
                i = int(np.argmin(finite))
                what = "NaN" if np.isnan(block[i]).any() else "an infinity"
                raise DataError(
                    f"{source.path}: sample {start + i} holds {what}; float inputs must be finite "
                    "(fix or drop that row)"
                )
        if stats is not None:
            stats.add(block if member is None else block[member[start : start + len(block)]])
        bar.update(len(block))
    bar.close()


def default_shard_size(sample_shape: tuple[int, ...], dtype: np.dtype, count: int) -> int:
    """Samples per shard: shards of about DEFAULT_SHARD_BYTES, but at least MIN_SHARDS of them."""
    payload = 128 + math.prod(sample_shape) * dtype.itemsize  # .npy header + data
    sample_bytes = -(-payload // 512) * 512 + _TAR_OVERHEAD
    return max(1, min(DEFAULT_SHARD_BYTES // sample_bytes, math.ceil(count / MIN_SHARDS)))


def _write_split(
    split: _Split, staging: Path, *, shard_size: int | None, classes: int, progress: bool
) -> SplitEntry:
    source = split.source
    size = shard_size or default_shard_size(source.sample_shape, source.dtype, len(split.rows))
    writer = SplitWriter(
        staging, split.name, shard_size=size, num_tasks=split.labels.shape[1], input_key="npy"
    )
    labels = split.labels.astype(label_dtype(classes))
    width = max(6, len(str(source.count - 1)))
    step = source.chunk_rows
    with tqdm(total=len(split.rows), desc=f"arrays {split.name}", unit="sample", disable=not progress) as bar:
        for start in range(0, len(split.rows), step):
            rows = split.rows[start : start + step]
            block = source.read(rows)
            for j, row in enumerate(rows):
                writer.write(f"{row:0{width}d}", encode_npy(block[j]), labels[start + j])
            bar.update(len(rows))
    return writer.close()


def convert_arrays(
    inputs: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    test_inputs: str | os.PathLike[str] | None = None,
    test_labels: str | os.PathLike[str] | None = None,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    shard_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``{split}-%06d.tar`` shards and ``manifest.json`` into ``out_dir``; return the manifest path.

    The test split comes from ``test_inputs`` + ``test_labels`` or is the ``test_fraction`` of the
    rows of ``inputs`` (seeded by ``seed``); one of the two is required, since silently holding out
    part of the data (or testing on a set the user did not choose) would be a surprise. ``val_fraction``
    adds a "val" split drawn from the rows of ``inputs`` the same way. Sample keys are the
    zero-padded row index within the source file. ``shard_size`` None picks ``default_shard_size``
    per split. Arguments are ConfigErrors; bad files DataErrors naming the file and the position;
    ``out_dir`` is left as it was on any failure.
    """
    fraction, val = _check_arguments(test_inputs, test_labels, test_fraction, val_fraction, seed)
    if shard_size is not None:
        check_shard_size(shard_size)
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    source = load_inputs(inputs)
    table = load_labels(labels, source)
    test = None
    if test_inputs is not None and test_labels is not None:
        test_source = load_inputs(test_inputs)
        if (test_source.sample_shape, test_source.dtype) != (source.sample_shape, source.dtype):
            raise DataError(
                f"{test_source.path}: samples of shape {list(test_source.sample_shape)} and dtype "
                f"{test_source.dtype}, but those of {source.path} are {list(source.sample_shape)} "
                f"{source.dtype}; the test inputs must match"
            )
        test = (test_source, _align_tasks(table, load_labels(test_labels, test_source)))
    splits = _plan_splits(source, table, test, {"test": fraction, "val": val}, seed)
    highest = np.max([s.labels.max(axis=0) for s in splits], axis=0)
    tasks = tuple(
        TaskSpec(name, max(2, int(top) + 1)) for name, top in zip(table.names, highest, strict=True)
    )
    _check_labelled(splits, table.names)
    channels = source.sample_shape[0]
    stats = ChannelStats(channels, scale=1 / 255 if source.dtype == np.uint8 else 1.0)
    _scan(source, stats, splits[0].rows, progress)
    if test is not None:
        _scan(test[0], None, None, progress)
    classes = max(task.num_classes for task in tasks)
    with staged_output(out_dir) as staging:
        entries = {
            split.name: _write_split(
                split, staging, shard_size=shard_size, classes=classes, progress=progress
            )
            for split in splits
        }
        mean, std = stats.mean_std()
        manifest = ShardManifest(
            tasks=tasks,
            input_key="npy",
            input_shape=source.sample_shape,
            input_dtype=source.dtype.name,
            mean=mean,
            std=std,
            stats_split="train",
            splits=entries,
        )
        write_manifest(staging, manifest)
    return out_dir / MANIFEST_NAME
