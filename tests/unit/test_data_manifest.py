"""A malformed shard manifest fails up front with a DataError naming manifest.json and the dotted key.

Every case is checked through ``read_manifest`` and through what is built on it (``build_dataset``
for a shard directory, ``dataset_num_tasks``), so a bad manifest stops a run before any shard is read.
"""

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
    ShardSource,
    build_dataset,
    dataset_num_tasks,
    read_manifest,
    replica_shards,
)
from dist_mtl.errors import ConfigError, DataError
from tests.unit.test_stream_shards import Written, write_shards


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    """train 40 samples in 5 shards, val 4 in 1, test 8 in 2; three tasks; 4 x 4 RGB PNGs."""
    directory = tmp_path_factory.mktemp("manifest") / "wds"
    return write_shards(
        directory, counts={"train": 40, "val": 4, "test": 8}, shard_size={"train": 8, "val": 4, "test": 4}
    )


@pytest.fixture
def shards(written, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(written.directory, tmp_path / "wds"))


def _edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return path


def _expect(directory: Path, message: str, error: type[Exception] = DataError) -> None:
    """read_manifest and everything built on it fail with ``error`` whose message starts as given."""
    pattern = "^" + re.escape(message)
    with pytest.raises(error, match=pattern):
        read_manifest(directory)
    with pytest.raises(error, match=pattern):
        build_dataset("shards", seed=0, path=str(directory), image_size=4)
    with pytest.raises(error, match=pattern):
        dataset_num_tasks("celeba", path=str(directory))


def test_intact_manifest_reads_as_written(written):
    manifest = read_manifest(written.directory)
    assert manifest == written.manifest
    assert manifest.count("train") == 40 and len(manifest.shards("train")) == 5
    assert [t.num_classes for t in manifest.tasks] == [2, 3, 5] and manifest.input_shape == (3, 4, 4)


def test_missing_manifest_names_the_path_and_the_fix(shards):
    (shards / "manifest.json").unlink()
    _expect(
        shards,
        f"{shards / 'manifest.json'}: missing; write the directory with `dist-mtl data celeba` or "
        "`dist-mtl data arrays`",
        DataFileNotFoundError,
    )


def test_missing_directory(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=f"^shard directory {tmp_path / 'none'} does not exist"):
        read_manifest(tmp_path / "none")
    with pytest.raises(ConfigError, match=f"^data.path: no such directory: {tmp_path / 'none'}"):
        build_dataset("shards", seed=0, path=str(tmp_path / "none"))


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
        ("tasks",),
        ("tasks", 1, "name"),
        ("tasks", 0, "classes"),
        ("input",),
        ("input", "key"),
        ("input", "shape"),
        ("input", "dtype"),
        ("labels",),
        ("labels", "key"),
        ("normalization",),
        ("normalization", "mean"),
        ("normalization", "std"),
        ("normalization", "computed_on"),
        ("splits",),
        ("splits", "train", "shards"),
        ("splits", "train", "count"),
        ("splits", "train", "labelled"),
        ("splits", "val", "shards", 0, "name"),
        ("splits", "train", "shards", 2, "count"),
        ("splits", "train", "shards", 2, "bytes"),
    ],
)
def test_missing_key_is_named(shards, keys):
    path = _edit(shards, lambda raw: _walk(raw, keys[:-1]).pop(keys[-1]))
    _expect(shards, f"{path}: {_dotted(keys)}: missing")


@pytest.mark.parametrize(
    ("keys", "value", "problem"),
    [
        (
            ("format",),
            "webdataset",
            "expected 'dist_mtl-shards/1', got 'webdataset'; write the directory again",
        ),
        (("tasks",), "Smiling", "expected a list, got a string"),
        (("tasks",), [], "expected distinct task names, at least one, got []"),
        (("tasks", 1), "right", "expected an object, got a string"),
        (("tasks", 1, "name"), 7, "expected a non-empty string, got 7"),
        (("tasks", 2, "classes"), 1, "expected an integer >= 2, got 1"),
        (("input", "key"), "bmp", "expected one of jpg, png, npy, got 'bmp'"),
        (("input", "dtype"), "float32", "expected one of uint8 for png, got 'float32'"),
        (("input", "shape"), [3, 4], "expected [C, H, W] of positive integers or null, got [3, 4]"),
        (("input", "shape"), [3, 0, 4], "expected [C, H, W] of positive integers or null, got [3, 0, 4]"),
        (("labels", "key"), "labels.npy", "expected 'cls.npy', got 'labels.npy'"),
        (("normalization",), None, "expected an object, got null"),
        (
            ("normalization", "mean"),
            [0.5, "a", 0.5],
            "expected one of finite numbers per channel, got [0.5, 'a', 0.5]",
        ),
        (
            ("normalization", "std"),
            [0.2, 0, 0.2],
            "expected one of positive numbers per channel, got [0.2, 0, 0.2]",
        ),
        (("splits",), [], "expected an object, got a list"),
        (("splits", "train"), 16, "expected an object, got a number"),
        (("splits", "train", "count"), 41, "41, but its shards hold 40"),
        (
            ("splits", "train", "labelled"),
            [1, 2],
            "expected 3 integers in [0, 40] (one per task), got [1, 2]",
        ),
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


def test_duplicate_task_names_are_named(shards):
    path = _edit(shards, lambda raw: raw["tasks"][1].update(name="left"))
    _expect(
        shards, f"{path}: tasks: expected distinct task names, at least one, got ['left', 'left', 'colour']"
    )


def test_arrays_need_a_shape_and_channels_match_the_statistics(shards):
    def to_arrays(raw: dict[str, Any]) -> None:
        raw["input"].update(key="npy", shape=None)

    path = _edit(shards, to_arrays)
    _expect(shards, f"{path}: input.shape: arrays (npy) need their [C, H, W] shape, got null")
    path = _edit(shards, lambda raw: raw["input"].update(key="png", shape=[1, 4, 4]))
    _expect(shards, f"{path}: normalization: expected 1 values (one per channel) in mean and std")


def test_a_task_without_labels_in_a_split_is_named(shards):
    path = _edit(shards, lambda raw: raw["splits"]["val"].update(labelled=[0, 4, 4]))
    _expect(shards, f"{path}: splits.val.labelled: task(s) 'left' have no labelled sample in split 'val'")


def test_listed_shard_that_is_absent_names_the_manifest_key_and_the_shard(shards):
    (shards / "train-000002.tar").unlink()
    _expect(
        shards,
        f"{shards / 'manifest.json'}: splits.train.shards[2].name: shard {shards / 'train-000002.tar'} "
        "is listed but missing",
        DataFileNotFoundError,
    )


def test_listed_size_that_differs_names_the_shard_and_the_key(shards):
    shard = shards / "train-000001.tar"
    size = shard.stat().st_size
    path = _edit(shards, lambda raw: raw["splits"]["train"]["shards"][1].update(bytes=size + 512))
    _expect(
        shards,
        f"{shard}: {size} bytes but {path} lists {size + 512} (splits.train.shards[1].bytes): "
        "the shard is cut off or was replaced, convert again",
    )


def test_splits_the_manifest_lacks_or_cannot_deal_are_named(written):
    manifest = read_manifest(written.directory)
    with pytest.raises(
        DataError, match="^split 'dev' is not in manifest.json; converted splits: train, val, test"
    ):
        replica_shards(manifest, "dev", replica_index=0, num_replicas=1)
    with pytest.raises(DataError, match="^split 'val' has 1 shards but 2 data-parallel parts read it"):
        replica_shards(manifest, "val", replica_index=0, num_replicas=2)
    assert replica_shards(manifest, "train", replica_index=1, num_replicas=2) == (
        "train-000001.tar",
        "train-000003.tar",
    )
    with pytest.raises(
        ConfigError, match="^data.test_split: 'dev' is not a split of .*; its splits: train, val, test"
    ):
        ShardSource(written.directory, test_split="dev")


def test_a_directory_without_a_train_split_is_named(shards):
    path = _edit(shards, lambda raw: raw["splits"].pop("train"))
    with pytest.raises(
        DataError, match="^split 'train' is not in manifest.json; converted splits: val, test"
    ):
        build_dataset("shards", seed=0, path=str(shards))
    assert path.is_file()
