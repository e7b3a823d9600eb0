"""The converters' shared writer (staging, shards, statistics); the CelebA converter's errors and options."""

from __future__ import annotations

import inspect
import io
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_mtl.data import celeba_convert
from dist_mtl.data.celeba_convert import DEFAULT_SHARD_SIZE, convert_celeba
from dist_mtl.data.celeba_miniature import make_celeba_miniature
from dist_mtl.data.manifest import read_manifest
from dist_mtl.data.shard_writer import ChannelStats, SplitWriter, encode_npy, label_dtype, staged_output
from dist_mtl.errors import ConfigError, DataError


def test_channel_stats_combine_batches_exactly_as_numpy_over_all_of_them():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4, 3, 5)) for n in (1, 0, 7, 2, 30)]
    batches[2][:, 1] += 1e6  # a large offset on one channel: no cancellation
    stats = ChannelStats(4, scale=0.5)
    for batch in batches:
        stats.add(batch)
    everything = np.concatenate(batches) * 0.5
    mean, std = stats.mean_std()
    assert np.allclose(mean, everything.mean(axis=(0, 2, 3)), rtol=1e-14, atol=0)
    assert np.allclose(std, everything.std(axis=(0, 2, 3)), rtol=1e-9, atol=0)
    constant = ChannelStats(2)
    constant.add(np.full((3, 2, 4, 4), 0.1))
    mean, std = constant.mean_std()
    assert np.allclose(mean, 0.1, rtol=1e-15) and std == (1.0, 1.0)  # rounding is no spread
    assert ChannelStats(3).mean_std() == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_channel_stats_of_single_samples_of_varying_size_buffered_or_not():
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 256, size=(3, 2 + i % 5, 3 + i % 2), dtype=np.uint8) for i in range(600)]
    stats = ChannelStats(3, scale=1 / 255)
    for sample in samples:
        stats.add_sample(sample)  # flushed at 256 and 512; the rest when asked
    pixels = np.concatenate([s.reshape(3, -1) for s in samples], axis=1) / 255
    mean, std = stats.mean_std()
    assert np.allclose(mean, pixels.mean(axis=1), rtol=1e-13)
    assert np.allclose(std, pixels.std(axis=1), rtol=1e-12)
    assert stats.count == pixels.shape[1]


def test_label_dtype_and_npy_bytes():
    assert [label_dtype(c) for c in (2, 128, 129, 32768, 32769)] == [
        np.int8,
        np.int8,
        np.int16,
        np.int16,
        np.int32,
    ]
    for array in (np.arange(6, dtype=np.int8), np.ones((2, 3), dtype=">f4"), np.asfortranarray(np.eye(3))):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array))
        assert encode_npy(array) == buffer.getvalue()


def test_split_writer_counts_samples_bytes_and_labelled(tmp_path):
    writer = SplitWriter(tmp_path, "dev", shard_size=2, num_tasks=2, input_key="png")
    labels = [[0, -1], [1, -1], [-1, -1], [2, 0], [-1, 3]]
    for i, row in enumerate(labels):
        writer.write(f"k{i}", bytes([i]) * 10, np.array(row, dtype=np.int8))
    entry = writer.close()
    assert [(s.name, s.count) for s in entry.shards] == [
        ("dev-000000.tar", 2),
        ("dev-000001.tar", 2),
        ("dev-000002.tar", 1),
    ]
    assert all(s.bytes == (tmp_path / s.name).stat().st_size for s in entry.shards)
    assert entry.labelled == (3, 2) and entry.count == 5
    with tarfile.open(tmp_path / "dev-000002.tar") as tar:
        assert tar.getnames() == ["k4.cls.npy", "k4.png"] and tar.extractfile("k4.png").read() == b"\x04" * 10
        assert np.load(io.BytesIO(tar.extractfile("k4.cls.npy").read())).tolist() == [-1, 3]
    assert SplitWriter(tmp_path, "empty", shard_size=2, num_tasks=1, input_key="npy").close().shards == ()


def test_staged_output_publishes_on_success_and_removes_everything_on_failure(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "manifest.json").write_text("1")
        assert not out.exists()
    assert (out / "manifest.json").read_text() == "1" and oct(out.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(KeyboardInterrupt), staged_output(out) as staging:
        (staging / "manifest.json").write_text("2")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "manifest.json").read_text() == "1"
    with staged_output(out) as staging:
        (staging / "manifest.json").write_text("3")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "manifest.json").read_text() == "3"


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return make_celeba_miniature(tmp_path_factory.mktemp("celeba"), num_images=20, seed=5)


@pytest.fixture
def copy_root(mini_root, tmp_path) -> Path:
    """A private copy of the miniature that a test may damage."""
    return Path(shutil.copytree(mini_root, tmp_path / "copy"))


def _image(root: Path, number: int) -> Path:
    return root / "Img" / "img_align_celeba" / f"{number:06d}.jpg"


@pytest.mark.parametrize("image_size", [None, 8])
@pytest.mark.parametrize(
    ("number", "damage"),
    [
        (3, lambda data: b"not a jpeg"),  # a train image: unreadable header
        (18, lambda data: data[: len(data) // 2]),  # a val image, copied as is: valid header, cut-off scan
    ],
)
def test_unreadable_source_image_is_a_data_error_and_writes_nothing(
    copy_root, tmp_path, image_size, number, damage
):
    path = _image(copy_root, number)
    path.write_bytes(damage(path.read_bytes()))
    out = tmp_path / "out" / "wds"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: not a readable image \\("):
        convert_celeba(copy_root, out, image_size=image_size, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []  # atomic: no output, no staging left


def test_default_shard_size_is_one_constant(mini_root, tmp_path):
    assert inspect.signature(convert_celeba).parameters["shard_size"].default == DEFAULT_SHARD_SIZE
    assert celeba_convert.DEFAULT_SHARD_SIZE == DEFAULT_SHARD_SIZE == 2000
    convert_celeba(mini_root, tmp_path / "wds", progress=False)
    assert len(read_manifest(tmp_path / "wds").shards("train")) == 1


def test_progress_bar_on_by_default_and_off_on_request(mini_root, tmp_path, capsys):
    convert_celeba(mini_root, tmp_path / "a", image_size=8)
    err = capsys.readouterr().err
    assert "celeba train" in err and "16/16" in err and "celeba test" in err
    convert_celeba(mini_root, tmp_path / "b", image_size=8, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard_size": 0}, "shard_size: expected an integer >= 1, got 0"),
        ({"image_size": True}, "image_size: expected None (keep the original JPEGs) or an integer >= 1"),
        ({"splits": ("train", "dev")}, "splits: expected distinct names among train, val, test"),
    ],
)
def test_argument_errors_are_config_errors(mini_root, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        convert_celeba(mini_root, tmp_path / "wds", progress=False, **kwargs)


def test_unusable_output_directory_is_a_data_error(mini_root, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no manifest.json; refusing to replace it"):
        convert_celeba(mini_root, tmp_path, progress=False)
    with pytest.raises(DataError, match="keep.txt: output exists and is not a directory"):
        convert_celeba(mini_root, tmp_path / "keep.txt", progress=False)
