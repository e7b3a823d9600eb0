"""A malformed shard manifest fails up front with a DataError naming manifest.json and the key."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dist_mtl.data import (
    DataFileNotFoundError,
    build_dataset,
    convert_celeba,
    iter_celeba_shards,
    make_celeba_miniature,
    read_manifest,
)
from dist_mtl.errors import DataError


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = make_celeba_miniature(tmp_path_factory.mktemp("celeba"), num_images=20, seed=3)
    out = tmp_path_factory.mktemp("shards") / "wds"
    convert_celeba(root, out, image_size=8, shard_size=4, progress=False)
    return out


@pytest.fixture
def shards(converted, tmp_path) -> Path:
    """A private copy of the converted miniature that a test may damage."""
    return Path(shutil.copytree(converted, tmp_path / "wds"))


def _edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return path


def _expect(directory: Path, message: str, error: type[Exception] = DataError) -> None:
    """read_manifest and every reader built on it fail with ``error`` whose message starts as given."""
    pattern = "^" + re.escape(message)
    with pytest.raises(error, match=pattern):
        read_manifest(directory)
    with pytest.raises(error, match=pattern):
        build_dataset("celeba", seed=0, path=str(directory), image_size=8)
    with pytest.raises(error, match=pattern):
        iter_celeba_shards(directory, "train", replica_index=0, num_replicas=1)


def test_intact_manifest_reads(converted):
    manifest = read_manifest(converted)
    assert manifest.count("train") == 16 and len(manifest.shards("train")) == 4 and manifest.image_size == 8


def test_missing_manifest_names_the_path_and_the_fix(shards):
    (shards / "manifest.json").unlink()
    _expect(shards, f"{shards / 'manifest.json'}: missing; write the shards with", DataFileNotFoundError)


def test_missing_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=f"^CelebA shard directory {tmp_path / 'none'} does not"):
        read_manifest(tmp_path / "none")


def test_invalid_json_names_the_path_and_the_position(shards):
    path = shards / "manifest.json"
    path.write_text(path.read_text()[:50])
    _expect(shards, f"{path}: not valid JSON (")
    path.write_bytes(b"\xff\xfe{}")
    _expect(shards, f"{path}: not UTF-8 text")
    path.write_text("[1, 2]")
    _expect(shards, f"{path}: (top level): expected an object, got a list")


def _dotted(keys: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def _walk(raw: dict[str, Any], keys: tuple[str | int, ...]) -> Any:
    for key in keys:
        raw = raw[key]
    return raw


@pytest.mark.parametrize(
    "keys",
    [
        ("format",),
        ("attributes",),
        ("image_size",),
        ("keys",),
        ("normalization",),
        ("normalization", "mean"),
        ("normalization", "std"),
        ("normalization", "computed_on"),
        ("splits",),
        ("splits", "train", "shards"),
        ("splits", "train", "count"),
        ("splits", "val", "shards", 0, "name"),
        ("splits", "train", "shards", 2, "count"),
    ],
)
def test_missing_key_is_named(shards, keys):
    path = _edit(shards, lambda raw: _walk(raw, keys[:-1]).pop(keys[-1]))
    _expect(shards, f"{path}: {_dotted(keys)}: missing")


@pytest.mark.parametrize(
    ("keys", "value", "problem"),
    [
        (("format",), "webdataset", "expected 'dist_mtl-celeba-webdataset/1', got 'webdataset'"),
        (("attributes",), "Smiling", "expected a list, got a string"),
        (("attributes",), [], "expected distinct names, at least one, got []"),
        (("attributes", 3), 7, "expected a non-empty string, got 7"),
        (("image_size",), "64", "expected an integer >= 1, got '64'"),
        (("keys",), {"image": "png", "labels": "cls.npy"}, "expected {'image': 'jpg', 'labels': 'cls.npy'}"),
        (("normalization",), None, "expected an object, got null"),
        (("normalization", "mean"), [0.5, 0.5], "expected 3 finite numbers (r, g, b), got [0.5, 0.5]"),
        (("normalization", "std"), [0.2, 0, 0.2], "expected 3 positive numbers (r, g, b), got [0.2, 0, 0.2]"),
        (("splits",), [], "expected an object, got a list"),
        (("splits", "train"), 16, "expected an object, got a number"),
        (("splits", "train", "count"), 17, "17, but its shards hold 16"),
        (("splits", "train", "shards", 1, "count"), -1, "expected an integer >= 0, got -1"),
        (("splits", "train", "shards", 1, "count"), True, "expected an integer >= 0, got True"),
        (("splits", "train", "shards", 1, "name"), "../x.tar", "expected a file name in"),
    ],
)
def test_ill_typed_key_is_named(shards, keys, value, problem):
    def change(raw: dict[str, Any]) -> None:
        _walk(raw, keys[:-1])[keys[-1]] = value

    path = _edit(shards, change)
    _expect(shards, f"{path}: {_dotted(keys)}: {problem}")


def test_listed_shard_that_is_absent_names_the_manifest_key_and_the_shard(shards):
    (shards / "train-000002.tar").unlink()
    _expect(
        shards,
        f"{shards / 'manifest.json'}: splits.train.shards[2].name: shard {shards / 'train-000002.tar'} "
        "is listed but missing",
        DataFileNotFoundError,
    )


def test_a_split_the_manifest_lacks_is_a_data_error(converted):
    with pytest.raises(DataError, match="^split 'dev' is not in manifest.json; converted splits: train, val"):
        iter_celeba_shards(converted, "dev", replica_index=0, num_replicas=1)
    with pytest.raises(DataError, match="^split 'val' has 1 shards but 2 replicas read it"):
        iter_celeba_shards(converted, "val", replica_index=0, num_replicas=2)
