"""The ``manifest.json`` that describes a directory of CelebA webdataset shards.

Layout of the directory: ``{split}-%06d.tar`` shards, each sample a ``jpg`` (JPEG bytes) and a
``cls.npy`` (uint8 array of the 40 labels as 0/1) under the key of the image name without suffix, plus::

    {"format": "dist_mtl-celeba-webdataset/1", "attributes": [40 names], "image_size": null | int,
     "keys": {"image": "jpg", "labels": "cls.npy"},
     "normalization": {"mean": [r, g, b], "std": [r, g, b], "computed_on": "train"},
     "splits": {"train": {"count": N, "shards": [{"name": "train-000000.tar", "count": n}, ...]}, ...}}

``image_size`` null means the original JPEG bytes were copied; the normalisation statistics are the
per-channel mean and standard deviation (pixels in [0, 1]) of the ``computed_on`` split as stored.

``read_manifest`` checks every key and type and that every listed shard exists, so a damaged or
hand-edited manifest fails once, up front, with a DataError naming ``manifest.json`` and the key,
instead of a KeyError or a short read later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dist_mtl-celeba-webdataset/1"
SHARD_PATTERN = "{split}-%06d.tar"
IMAGE_KEY = "jpg"
LABEL_KEY = "cls.npy"


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard and how many samples it holds."""

    name: str
    count: int


@dataclass(frozen=True)
class CelebAManifest:
    """What a reader needs to know about a shard directory."""

    attributes: tuple[str, ...]
    image_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stats_split: str
    splits: dict[str, tuple[ShardEntry, ...]]

    def count(self, split: str) -> int:
        """Number of samples in ``split``."""
        return sum(shard.count for shard in self.shards(split))

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        """Shards of ``split`` in order; a DataError lists the splits the manifest has."""
        if split not in self.splits:
            raise DataError(
                f"split {split!r} is not in {MANIFEST_NAME}; converted splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "attributes": list(self.attributes),
            "image_size": self.image_size,
            "keys": {"image": IMAGE_KEY, "labels": LABEL_KEY},
            "normalization": {
                "mean": list(self.mean),
                "std": list(self.std),
                "computed_on": self.stats_split,
            },
            "splits": {
                split: {
                    "count": sum(s.count for s in shards),
                    "shards": [{"name": s.name, "count": s.count} for s in shards],
                }
                for split, shards in self.splits.items()
            },
        }


def write_manifest(directory: Path, manifest: CelebAManifest) -> Path:
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

    def channels(self, obj: dict[str, Any], key: str, *, positive: bool) -> tuple[float, float, float]:
        values = self.array(obj, key)
        numbers = [float(v) for v in values if not isinstance(v, bool) and isinstance(v, (int, float))]
        ok = len(values) == 3 and len(numbers) == 3 and all(map(math.isfinite, numbers))
        if not ok or (positive and min(numbers) <= 0):
            kind = "positive numbers" if positive else "finite numbers"
            raise self.error(key, f"expected 3 {kind} (r, g, b), got {values!r}")
        return (numbers[0], numbers[1], numbers[2])


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataFileNotFoundError(
            f"{path}: missing; write the shards with `dist-mtl data celeba ROOT {path.parent}`"
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
    fields: _Fields, directory: Path, splits: dict[str, Any], split: str
) -> tuple[ShardEntry, ...]:
    key = f"splits.{split}"
    entry = fields.is_mapping(splits[split], key)  # not get(): a split name may contain a dot
    shards = []
    for i, value in enumerate(fields.array(entry, f"{key}.shards")):
        item = fields.is_mapping(value, f"{key}.shards[{i}]")
        name = fields.string(item, f"{key}.shards[{i}].name")
        if Path(name).name != name or name in (".", ".."):
            raise fields.error(
                f"{key}.shards[{i}].name", f"expected a file name in {directory}, got {name!r}"
            )
        if not (directory / name).is_file():
            raise DataFileNotFoundError(
                f"{fields.path}: {key}.shards[{i}].name: shard {directory / name} is listed but missing"
            )
        shards.append(ShardEntry(name, fields.integer(item, f"{key}.shards[{i}].count", minimum=0)))
    count = fields.integer(entry, f"{key}.count", minimum=0)
    if count != sum(s.count for s in shards):
        raise fields.error(f"{key}.count", f"{count}, but its shards hold {sum(s.count for s in shards)}")
    return tuple(shards)


def read_manifest(directory: str | Path) -> CelebAManifest:
    """Load and check ``directory/manifest.json``; errors name the path and the offending key.

    A missing directory, manifest or shard is a DataFileNotFoundError; anything malformed (JSON,
    keys, types, counts) a DataError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFileNotFoundError(
            f"CelebA shard directory {directory} does not exist or is not a directory"
        )
    path = directory / MANIFEST_NAME
    raw = _load_json(path)
    fields = _Fields(path)
    if fields.get(raw, "format") != MANIFEST_FORMAT:
        raise fields.error("format", f"expected {MANIFEST_FORMAT!r}, got {raw['format']!r}")
    attributes = tuple(
        fields.is_string(name, f"attributes[{i}]") for i, name in enumerate(fields.array(raw, "attributes"))
    )
    if not attributes or len(set(attributes)) != len(attributes):
        raise fields.error("attributes", f"expected distinct names, at least one, got {list(attributes)}")
    keys = {"image": IMAGE_KEY, "labels": LABEL_KEY}
    if fields.get(raw, "keys") != keys:
        raise fields.error("keys", f"expected {keys}, got {raw['keys']!r}")
    image_size = (
        None if fields.get(raw, "image_size") is None else fields.integer(raw, "image_size", minimum=1)
    )
    norm = fields.mapping(raw, "normalization")
    splits = fields.mapping(raw, "splits")
    return CelebAManifest(
        attributes=attributes,
        image_size=image_size,
        mean=fields.channels(norm, "normalization.mean", positive=False),
        std=fields.channels(norm, "normalization.std", positive=True),
        stats_split=fields.string(norm, "normalization.computed_on"),
        splits={split: _parse_split(fields, directory, splits, split) for split in splits},
    )
