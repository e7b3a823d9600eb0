"""Damaged CelebA shards: every case is a DataError naming the shard file and the sample key.

The shards are the generated miniature, converted, then cut off or overwritten in place at member
offsets found with ``tarfile`` (byte surgery, so the rest of the tar is byte-identical).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_mtl.data import (
    build_dataset,
    convert_celeba,
    iter_celeba_shards,
    load_celeba_split,
    make_celeba_miniature,
)
from dist_mtl.errors import DataError

SHARD = "train-000003.tar"  # train samples 25..32 (keys 000025 .. 000032), 8 of the split's 48


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = make_celeba_miniature(tmp_path_factory.mktemp("celeba"), num_images=60, seed=4)
    out = tmp_path_factory.mktemp("shards") / "wds"
    convert_celeba(root, out, shard_size=8, progress=False)
    return out


@pytest.fixture
def shards(converted, tmp_path) -> Path:
    """A private copy of the converted miniature that a test may damage."""
    return Path(shutil.copytree(converted, tmp_path / "wds"))


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {member.name: member for member in tar.getmembers()}


def _cut(path: Path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[:offset])


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _expect_load(directory: Path, message: str) -> None:
    with pytest.raises(DataError, match="^" + re.escape(message)):
        build_dataset("celeba", seed=0, path=str(directory), image_size=8)


def test_intact_shards_read_completely(converted):
    assert len(load_celeba_split(converted, "train", image_size=8)) == 48


def test_shard_cut_off_between_samples_is_not_a_silently_shorter_split(shards):
    shard = shards / SHARD
    _cut(shard, _members(shard)["000027.cls.npy"].offset)  # keeps samples 000025 and 000026
    _expect_load(
        shards,
        f"{shard}: holds 2 samples but {shards / 'manifest.json'} lists 8 (last key read: '000026'); "
        "split 'train' expects 48 samples from 6 shards (train-000000.tar .. train-000005.tar), "
        "26 read so far: the shard is cut off or stale, convert again",
    )
    # The stream of a replica fails the same way, when it reaches the end of the short shard.
    stream = iter_celeba_shards(shards, "train", replica_index=1, num_replicas=2, image_size=8)
    with pytest.raises(
        DataError, match=re.escape(f"{shard}: holds 2 samples") + ".*split 'train' expects 24"
    ):
        list(stream)


def test_reading_fewer_samples_than_the_damage_does_not_fail(shards):
    shard = shards / SHARD
    _cut(shard, _members(shard)["000027.cls.npy"].offset)
    assert len(load_celeba_split(shards, "train", image_size=8, max_samples=26)) == 26


def test_corrupt_jpeg_names_shard_and_key(shards):
    shard = shards / SHARD
    jpeg = _members(shard)["000027.jpg"]
    _overwrite(shard, jpeg.offset_data, b"\0" * jpeg.size)
    _expect_load(shards, f"{shard}: sample '000027': jpg: not a readable image (cannot identify image file")


def test_truncated_jpeg_names_shard_and_key(shards):
    shard = shards / SHARD
    jpeg = _members(shard)["000030.jpg"]
    _overwrite(shard, jpeg.offset_data + jpeg.size // 3, b"\0" * (jpeg.size - jpeg.size // 3))
    _expect_load(shards, f"{shard}: sample '000030': jpg: not a readable image (")


def test_shard_cut_off_after_a_label_names_shard_and_key(shards):
    shard = shards / SHARD
    _cut(shard, _members(shard)["000027.jpg"].offset)  # sample 000027 keeps only its labels
    _expect_load(shards, f"{shard}: sample '000027': no jpg (fields: cls.npy); the shard is cut off")


def test_shard_cut_off_inside_a_member_names_shard_and_key(shards):
    shard = shards / SHARD
    _cut(shard, _members(shard)["000027.jpg"].offset_data + 100)
    _expect_load(
        shards, f"{shard}: damaged tar in member '000027.jpg' of sample '000027' (unexpected end of data)"
    )


def test_empty_shard_file_is_named(shards):
    (shards / SHARD).write_bytes(b"")
    _expect_load(shards, f"{shards / SHARD}: damaged tar before its first sample")


def test_labels_of_the_wrong_shape_or_values_name_shard_and_key(shards):
    shard = shards / SHARD
    member = _members(shard)["000028.cls.npy"]
    buffer = io.BytesIO()
    np.save(buffer, np.full(40, 2, dtype=np.uint8))  # same header, so the same size as the original
    assert len(buffer.getvalue()) == member.size
    _overwrite(shard, member.offset_data, buffer.getvalue())
    _expect_load(shards, f"{shard}: sample '000028': cls.npy must hold 40 labels of 0 or 1")


def test_shard_with_more_samples_than_listed_fails_at_the_first_extra_one(shards):
    path = shards / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["shards"][3]["count"] = 7
    raw["splits"]["train"]["count"] = 47
    path.write_text(json.dumps(raw))
    _expect_load(
        shards,
        f"{shards / SHARD}: holds more than 7 samples but {path} lists 7 (last key read: '000032'); "
        "split 'train' expects 47 samples",
    )
