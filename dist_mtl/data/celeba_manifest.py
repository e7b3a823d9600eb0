"""The ``manifest.json`` that describes a directory of CelebA webdataset shards.

Layout of the directory: ``{split}-%06d.tar`` shards, each sample a ``jpg`` (JPEG bytes) and a
``cls.npy`` (uint8 array of the 40 labels as 0/1) under the key of the image name without suffix, plus::

    {"format": "dist_mtl-celeba-webdataset/1", "attributes": [40 names], "image_size": null | int,
     "keys": {"image": "jpg", "labels": "cls.npy"},
     "normalization": {"mean": [r, g, b], "std": [r, g, b], "computed_on": "train"},
     "splits": {"train": {"count": N, "shards": [{"name": "train-000000.tar", "count": n}, ...]}, ...}}

``image_size`` null means the original JPEG bytes were copied; the normalisation statistics are the
per-channel mean and standard deviation (pixels in [0, 1]) of the ``computed_on`` split as stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """Shards of ``split`` in order; ValueError lists the splits the manifest has."""
        if split not in self.splits:
            raise ValueError(
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


def read_manifest(directory: str | Path) -> CelebAManifest:
    """Load and check ``directory/manifest.json``; errors name the path and the offending field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CelebA shard directory {directory} does not exist or is not a directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; write the shards with `dist-mtl data celeba ROOT {directory}`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format must be {MANIFEST_FORMAT!r}, got {raw.get('format')!r}")
        norm = raw["normalization"]
        return CelebAManifest(
            attributes=tuple(raw["attributes"]),
            image_size=raw["image_size"],
            mean=tuple(float(v) for v in norm["mean"]),
            std=tuple(float(v) for v in norm["std"]),
            stats_split=norm["computed_on"],
            splits={
                split: tuple(ShardEntry(s["name"], int(s["count"])) for s in entry["shards"])
                for split, entry in raw["splits"].items()
            },
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a dist_mtl CelebA manifest ({type(exc).__name__}: {exc})") from exc
