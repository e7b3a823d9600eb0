"""The ``manifest.json`` that describes a directory of multi-task webdataset shards (any data set).

Layout of the directory: ``{split}-%06d.tar`` shards; each sample holds its input under the manifest's
input key (``jpg`` / ``png``: encoded image bytes; ``npy``: the array as stored) and its labels as
``cls.npy`` (one integer per task, -1 meaning "no label for this task"), plus::

    {"format": "dist_mtl-shards/1",
     "tasks": [{"name": "Smiling", "classes": 2}, ...],
     "input": {"key": "jpg" | "png" | "npy", "shape": [C, H, W] | null, "dtype": "uint8" | "float32"},
     "labels": {"key": "cls.npy"},
     "normalization": {"mean": [C values], "std": [C values], "computed_on": "train"},
     "splits": {"train": {"count": N, "labelled": [per-task labelled counts],
                          "shards": [{"name": "train-000000.tar", "count": n, "bytes": b}, ...]}, ...}}

``input.shape`` null means images of varying size (the original CelebA JPEGs), resized when read.
Normalisation is per channel, of pixels in [0, 1] for uint8 inputs and of the stored values for
float32 ones. ``bytes`` is each shard's file size, so a truncated or replaced shard is found when the
manifest is read, before training, instead of mid-epoch.

``read_manifest`` checks every key and type, that every listed shard exists with its listed size,
and that every task has a labelled sample in every split, so a damaged or hand-edited directory fails
once, up front, with a DataError naming ``manifest.json`` (or the shard) and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_mtl.data.base import TaskSpec
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dist_mtl-shards/1"
SHARD_PATTERN = "{split}-%06d.tar"
LABEL_KEY = "cls.npy"
INPUT_KEYS = ("jpg", "png", "npy")  # encoded images, or arrays stored as they came
INPUT_DTYPES = ("uint8", "float32")
MISSING_LABEL = -1


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard: its file name, how many samples it holds and its size in bytes."""

    name: str
    count: int
    bytes: int


@dataclass(frozen=True)
class SplitEntry:
    """One split: its shards in order and, per task, how many of its samples carry a label."""

    shards: tuple[ShardEntry, ...]
    labelled: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(shard.count for shard in self.shards)


@dataclass(frozen=True)
class ShardManifest:
    """What a reader needs to know about a shard directory."""

    tasks: tuple[TaskSpec, ...]
    input_key: str
    input_shape: tuple[int, ...] | None  # (C, H, W); None: images of varying size
    input_dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_split: str
    splits: dict[str, SplitEntry]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def count(self, split: str) -> int:
        """Number of samples in ``split``."""
        return self.split(split).count

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        """Shards of ``split`` in order; a DataError lists the splits the manifest has."""
        return self.split(split).shards

    def split(self, split: str) -> SplitEntry:
        if split not in self.splits:
            raise DataError(
                f"split {split!r} is not in {MANIFEST_NAME}; converted splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "tasks": [{"name": t.name, "classes": t.num_classes} for t in self.tasks],
            "input": {
                "key": self.input_key,
                "shape": None if self.input_shape is None else list(self.input_shape),
                "dtype": self.input_dtype,
            },
            "labels": {"key": LABEL_KEY},
            "normalization": {
                "mean": list(self.mean),
                "std": list(self.std),
                "computed_on": self.stats_split,
            },
            "splits": {
                name: {
                    "count": split.count,
                    "labelled": list(split.labelled),
                    "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes} for s in split.shards],
                }
                for name, split in self.splits.items()
            },
        }


def write_manifest(directory: Path, manifest: ShardManifest) -> Path:
    """Write ``manifest.json`` into ``directory`` and return its path."""
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


class _Fields:
    """Typed access to the parsed JSON of one manifest; every failure names the file and the dotted key.

    Keys are dotted paths such as ``splits.train.shards[2].count``; ``get`` looks up the last part.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> DataError:
        return DataError(f"{self.path}: {key}: {problem}")

    def get(self, obj: dict[str, Any], key: str) -> Any:
        name = key.rsplit(".", 1)[-1]
        if name not in obj:
            raise self.error(key, "missing")
        return obj[name]

    def mapping(self, obj: dict[str, Any], key: str) -> dict[str, Any]:
        return self.is_mapping(self.get(obj, key), key)

    def is_mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object, got {_json_type(value)}")
        return value

    def array(self, obj: dict[str, Any], key: str) -> list[Any]:
        value = self.get(obj, key)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_json_type(value)}")
        return value

    def string(self, obj: dict[str, Any], key: str) -> str:
        return self.is_string(self.get(obj, key), key)

    def is_string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, obj: dict[str, Any], key: str, *, minimum: int) -> int:
        value = self.get(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def channels(self, obj: dict[str, Any], key: str, *, positive: bool) -> tuple[float, ...]:
        values = self.array(obj, key)
        numbers = [float(v) for v in values if not isinstance(v, bool) and isinstance(v, (int, float))]
        ok = len(values) >= 1 and len(numbers) == len(values) and all(map(math.isfinite, numbers))
        if not ok or (positive and min(numbers) <= 0):
            kind = "positive numbers" if positive else "finite numbers"
            raise self.error(key, f"expected one of {kind} per channel, got {values!r}")
        return tuple(numbers)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataFileNotFoundError(
            f"{path}: missing; write the directory with `dist-mtl data celeba` or `dist-mtl data arrays`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataError(f"{path}: not valid JSON ({exc.msg} at {where})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return _Fields(path).is_mapping(raw, "(top level)")


def _parse_split(
    fields: _Fields, directory: Path, splits: dict[str, Any], split: str, tasks: tuple[TaskSpec, ...]
) -> SplitEntry:
    key = f"splits.{split}"
    entry = fields.is_mapping(splits[split], key)  # not get(): a split name may contain a dot
    shards = []
    for i, value in enumerate(fields.array(entry, f"{key}.shards")):
        item = fields.is_mapping(value, f"{key}.shards[{i}]")
        where = f"{key}.shards[{i}]"
        name = fields.string(item, f"{where}.name")
        if Path(name).name != name or name in (".", ".."):
            raise fields.error(f"{where}.name", f"expected a file name in {directory}, got {name!r}")
        shard = directory / name
        if not shard.is_file():
            raise DataFileNotFoundError(f"{fields.path}: {where}.name: shard {shard} is listed but missing")
        size = fields.integer(item, f"{where}.bytes", minimum=0)
        if shard.stat().st_size != size:
            raise DataError(
                f"{shard}: {shard.stat().st_size} bytes but {fields.path} lists {size} ({where}.bytes): "
                "the shard is cut off or was replaced, convert again"
            )
        shards.append(ShardEntry(name, fields.integer(item, f"{where}.count", minimum=0), size))
    count = fields.integer(entry, f"{key}.count", minimum=0)
    if count != sum(s.count for s in shards):
        raise fields.error(f"{key}.count", f"{count}, but its shards hold {sum(s.count for s in shards)}")
    labelled = fields.array(entry, f"{key}.labelled")
    if len(labelled) != len(tasks) or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= count for v in labelled
    ):
        raise fields.error(
            f"{key}.labelled",
            f"expected {len(tasks)} integers in [0, {count}] (one per task), got {labelled!r}",
        )
    if count:
        empty = [t.name for t, n in zip(tasks, labelled, strict=True) if n == 0]
        if empty:
            raise fields.error(
                f"{key}.labelled",
                f"task(s) {', '.join(map(repr, empty))} have no labelled sample in split {split!r}: "
                "nothing could train or evaluate them; drop them from the labels or label some samples",
            )
    return SplitEntry(tuple(shards), tuple(labelled))


def _parse_tasks(fields: _Fields, raw: dict[str, Any]) -> tuple[TaskSpec, ...]:
    tasks = []
    for i, value in enumerate(fields.array(raw, "tasks")):
        item = fields.is_mapping(value, f"tasks[{i}]")
        tasks.append(
            TaskSpec(
                fields.string(item, f"tasks[{i}].name"),
                fields.integer(item, f"tasks[{i}].classes", minimum=2),
            )
        )
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise fields.error("tasks", f"expected distinct task names, at least one, got {names}")
    return tuple(tasks)


def read_manifest(directory: str | Path) -> ShardManifest:
    """Load and check ``directory/manifest.json``; errors name the path and the offending key.

    A missing directory, manifest or shard is a DataFileNotFoundError; anything malformed (JSON,
    keys, types, counts, shard sizes, a task without labels) a DataError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFileNotFoundError(f"shard directory {directory} does not exist or is not a directory")
    path = directory / MANIFEST_NAME
    raw = _load_json(path)
    fields = _Fields(path)
    if fields.get(raw, "format") != MANIFEST_FORMAT:
        raise fields.error(
            "format",
            f"expected {MANIFEST_FORMAT!r}, got {raw['format']!r}; write the directory again with "
            "`dist-mtl data celeba` or `dist-mtl data arrays`",
        )
    tasks = _parse_tasks(fields, raw)
    spec = fields.mapping(raw, "input")
    input_key = fields.string(spec, "input.key")
    if input_key not in INPUT_KEYS:
        raise fields.error("input.key", f"expected one of {', '.join(INPUT_KEYS)}, got {input_key!r}")
    dtype = fields.string(spec, "input.dtype")
    if dtype not in INPUT_DTYPES or (input_key != "npy" and dtype != "uint8"):
        valid = INPUT_DTYPES if input_key == "npy" else ("uint8",)
        raise fields.error(
            "input.dtype", f"expected one of {', '.join(valid)} for {input_key}, got {dtype!r}"
        )
    shape = fields.get(spec, "input.shape")
    if shape is not None:
        shape = tuple(fields.array(spec, "input.shape"))
        if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
            raise fields.error(
                "input.shape", f"expected [C, H, W] of positive integers or null, got {list(shape)}"
            )
    elif input_key == "npy":
        raise fields.error("input.shape", "arrays (npy) need their [C, H, W] shape, got null")
    labels = fields.mapping(raw, "labels")
    if fields.get(labels, "labels.key") != LABEL_KEY:
        raise fields.error("labels.key", f"expected {LABEL_KEY!r}, got {labels['key']!r}")
    norm = fields.mapping(raw, "normalization")
    mean = fields.channels(norm, "normalization.mean", positive=False)
    std = fields.channels(norm, "normalization.std", positive=True)
    channels = shape[0] if shape is not None else 3
    if len(mean) != channels or len(std) != channels:
        raise fields.error("normalization", f"expected {channels} values (one per channel) in mean and std")
    splits = fields.mapping(raw, "splits")
    return ShardManifest(
        tasks=tasks,
        input_key=input_key,
        input_shape=shape,
        input_dtype=dtype,
        mean=mean,
        std=std,
        stats_split=fields.string(norm, "normalization.computed_on"),
        splits={split: _parse_split(fields, directory, splits, split, tasks) for split in splits},
    )
