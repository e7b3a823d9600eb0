"""Damaged shards: every case is a DataError naming the shard file and, for a sample, its key.

CelebA shards are the generated miniature converted with ``convert_celeba``, then damaged in place at
member offsets found with ``tarfile`` (the file keeps its size, so only reading can find the damage),
or rewritten with the manifest's byte sizes updated (so the damage is past the manifest's size check).
Sample damage (an unreadable image or array, bad labels, a missing member) can be skipped with
``on_error="skip"``; structural damage (size, sample count, a broken tar) raises either way.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_mtl.data import ShardSource, build_dataset, convert_celeba, make_celeba_miniature
from dist_mtl.data.manifest import MANIFEST_NAME
from dist_mtl.errors import DataError
from tests.unit.test_stream_shards import members, overwrite, refresh_sizes, write_shards

SHARD = "train-000003.tar"  # train samples 25..32 (keys 000025 .. 000032), 8 of the split's 48
CPU = torch.device("cpu")
Members = list[tuple[str, bytes]]


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


def _read_train(directory: Path, **options) -> list:
    """Every train sample in manifest order (the train split evaluated as the test split)."""
    source = ShardSource(directory, image_size=8, test_split="train", **options)
    return list(source.eval_batches(batch_size=8, part=(0, 1), device=CPU))


def _expect(directory: Path, message: str, on_error: tuple[str, ...] = ("raise",)) -> None:
    for mode in on_error:
        with pytest.raises(DataError, match="^" + re.escape(message)):
            _read_train(directory, on_error=mode)


def _rewrite(shard: Path, change: Callable[[Members], Members]) -> None:
    """Write ``shard`` again with its members changed, and list its new size in the manifest."""
    with tarfile.open(shard) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for name, data in change(items):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refresh_sizes(shard.parent)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_intact_shards_read_completely_with_the_converted_labels(converted):
    batches = _read_train(converted)
    assert sum(len(b.y) for b in batches) == 48 and all(b.skipped == 0 for b in batches)
    labels = torch.cat([b.y for b in batches])
    with tarfile.open(converted / SHARD) as tar:
        stored = np.load(io.BytesIO(tar.extractfile("000027.cls.npy").read()))
    assert torch.equal(labels[26], torch.from_numpy(stored.astype(np.int64)))  # sample 000027 is ordinal 26
    assert ((labels == 0) | (labels == 1)).all()


def test_shard_cut_off_fails_when_the_source_is_built(shards):
    shard = shards / SHARD
    size = shard.stat().st_size
    cut = members(shard)["000027.cls.npy"].offset
    shard.write_bytes(shard.read_bytes()[:cut])  # a cut between samples reads as a complete, shorter tar
    with pytest.raises(
        DataError, match="^" + re.escape(f"{shard}: {cut} bytes but {shards / MANIFEST_NAME} lists {size}")
    ):
        build_dataset("celeba", seed=0, path=str(shards))


def test_damage_in_samples_no_step_reads_does_not_fail(shards):
    shard = shards / SHARD
    jpeg = members(shard)["000027.jpg"]
    overwrite(shard, jpeg.offset_data, b"\0" * jpeg.size)
    assert sum(len(b.y) for b in _read_train(shards, max_samples=24)) == 24  # shard 3 is never opened


def test_corrupt_jpeg_names_shard_and_key(shards):
    shard = shards / SHARD
    jpeg = members(shard)["000027.jpg"]
    overwrite(shard, jpeg.offset_data, b"\0" * jpeg.size)
    _expect(shards, f"{shard}: sample '000027': jpg: not a readable image (cannot identify image file")
    skipped = _read_train(shards, on_error="skip")
    assert [b.skipped for b in skipped] == [0, 0, 0, 1, 0, 0]
    assert (skipped[3].y[2] == -1).all() and not skipped[3].x[2].any()  # ordinal 26, row 2 of batch 3


def test_truncated_jpeg_names_shard_and_key(shards):
    shard = shards / SHARD
    jpeg = members(shard)["000030.jpg"]
    overwrite(shard, jpeg.offset_data + jpeg.size // 3, b"\0" * (jpeg.size - jpeg.size // 3))
    _expect(shards, f"{shard}: sample '000030': jpg: not a readable image (")


def test_label_out_of_range_names_shard_key_task_and_valid_range(shards):
    shard = shards / SHARD
    member = members(shard)["000028.cls.npy"]
    with tarfile.open(shard) as tar:
        original = np.load(io.BytesIO(tar.extractfile(member).read()))
    labels = original.copy()
    labels[3] = 2
    assert len(_npy(labels)) == member.size  # same dtype and shape: same size, in place
    overwrite(shard, member.offset_data, _npy(labels))
    _expect(
        shards,
        f"{shard}: sample '000028': cls.npy: task 'Bags_Under_Eyes' has label 2; valid: -1 (no label) to 1",
    )


def test_label_array_of_the_wrong_shape_or_type_names_shard_and_key(shards):
    shard = shards / SHARD
    _rewrite(
        shard,
        lambda items: [(n, _npy(np.zeros(39, np.int8)) if n == "000029.cls.npy" else d) for n, d in items],
    )
    _expect(
        shards,
        f"{shard}: sample '000029': cls.npy: expected 40 integer labels (one per task, -1 = no label), "
        "got |i1 [39]",
    )
    _rewrite(
        shard,
        lambda items: [(n, _npy(np.zeros(40, np.float32)) if n == "000029.cls.npy" else d) for n, d in items],
    )
    _expect(shards, f"{shard}: sample '000029': cls.npy: expected 40 integer labels", ("raise",))
    _rewrite(shard, lambda items: [(n, b"not npy" if n == "000029.cls.npy" else d) for n, d in items])
    _expect(shards, f"{shard}: sample '000029': cls.npy: not a .npy array (it does not start with the .npy")


def test_sample_without_its_image_names_shard_and_key(shards):
    shard = shards / SHARD
    _rewrite(shard, lambda items: [(n, d) for n, d in items if n != "000027.jpg"])
    _expect(shards, f"{shard}: sample '000027': no jpg member; every sample needs jpg and cls.npy")


def test_shard_with_fewer_samples_than_listed_fails_in_any_mode(shards):
    shard = shards / SHARD
    _rewrite(shard, lambda items: [(n, d) for n, d in items if not n.startswith("000032.")])
    _expect(
        shards,
        f"{shard}: holds 7 samples but {shards / MANIFEST_NAME} lists 8 (last key: '000031'): "
        "the shard is damaged or stale, convert again",
        ("raise", "skip"),
    )


def test_shard_with_more_samples_than_listed_fails_in_any_mode(shards):
    shard = shards / SHARD
    _rewrite(shard, lambda items: items + [("extra.jpg", items[1][1]), ("extra.cls.npy", items[0][1])])
    _expect(
        shards,
        f"{shard}: holds 9 samples but {shards / MANIFEST_NAME} lists 8 (last key: 'extra')",
        ("raise", "skip"),
    )


def test_overwritten_tar_header_names_the_shard_and_the_last_sample(shards):
    shard = shards / SHARD
    offset = members(shard)["000029.cls.npy"].offset
    overwrite(shard, offset, b"garbage!" * 64)  # one header block; tarfile would end the archive here
    _expect(
        shards,
        f"{shard}: damaged tar after member '000028.jpg' of sample '000028' (bad header checksum at byte "
        f"{offset}); convert again",
        ("raise", "skip"),
    )


def test_empty_shard_file_is_named(shards):
    (shards / SHARD).write_bytes(b"")
    refresh_sizes(shards)
    _expect(shards, f"{shards / SHARD}: damaged tar before its first sample (empty file)", ("raise", "skip"))


def test_missing_shard_fails_when_the_source_is_built(shards):
    (shards / SHARD).unlink()
    with pytest.raises(DataError, match=re.escape(f"shard {shards / SHARD} is listed but missing")):
        build_dataset("shards", seed=0, path=str(shards))


# --- arrays -------------------------------------------------------------------------------------------


@pytest.fixture
def arrays(tmp_path) -> Path:
    written = write_shards(
        tmp_path / "npy",
        counts={"train": 6, "test": 2},
        shard_size=3,
        input_key="npy",
        shape=(2, 3, 3),
        dtype="float32",
    )
    return written.directory


_EXPECTED = "expected a float32 array of shape [2, 3, 3] (the manifest's input.shape and input.dtype), got"


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        (
            np.zeros((2, 3, 4), np.float32),
            f"{_EXPECTED} <f4 [2, 3, 4]",
        ),
        (
            np.zeros((2, 3, 3), np.float64),
            f"{_EXPECTED} <f8 [2, 3, 3]",
        ),
        (np.full((2, 3, 3), np.nan, np.float32), "holds NaN or infinite values; inputs must be finite"),
    ],
)
def test_array_of_another_shape_type_or_with_nan_names_shard_and_key(arrays, stored, problem):
    shard = arrays / "train-000001.tar"
    _rewrite(shard, lambda items: [(n, _npy(stored) if n == "train00004.npy" else d) for n, d in items])
    _expect(arrays, f"{shard}: sample 'train00004': npy: {problem}")
    batches = _read_train(arrays, on_error="skip")
    assert [b.skipped for b in batches] == [1] and (batches[0].y[4] == -1).all()
