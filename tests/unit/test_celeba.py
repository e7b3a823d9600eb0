"""CelebA: layout parsing and its errors, shard conversion, the in-memory reader and replica sharding."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_mtl.data import (
    CELEBA_ATTRIBUTES,
    CelebAFormatError,
    build_dataset,
    convert_celeba,
    iter_celeba_shards,
    load_celeba_index,
    make_celeba_miniature,
    read_manifest,
    replica_shards,
)
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.errors import ConfigError

NUM_IMAGES = 30


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return make_celeba_miniature(tmp_path_factory.mktemp("celeba"), num_images=NUM_IMAGES, seed=1)


@pytest.fixture(scope="module")
def shards(mini_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "celeba-wds"
    convert_celeba(mini_root, out, shard_size=4)
    return out


@pytest.fixture
def copy_root(mini_root, tmp_path) -> Path:
    """A private copy of the miniature that a test may damage."""
    return Path(shutil.copytree(mini_root, tmp_path / "copy"))


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_official_and_torchvision_layouts_parse_to_the_same_index(mini_root, tmp_path):
    official = load_celeba_index(mini_root)
    flat = load_celeba_index(
        make_celeba_miniature(tmp_path, num_images=NUM_IMAGES, seed=1, layout="torchvision")
    )
    assert official.layout.kind == "official" and flat.layout.kind == "torchvision"
    assert official.filenames == flat.filenames == tuple(f"{i:06d}.jpg" for i in range(1, NUM_IMAGES + 1))
    assert np.array_equal(official.labels, flat.labels) and official.labels.shape == (NUM_IMAGES, 40)
    assert [len(official.split_indices(s)) for s in ("train", "val", "test")] == [24, 3, 3]
    assert list(official.split_indices("val")) == [24, 25, 26]  # official order: train, val, test blocks


def test_labels_map_minus_one_to_zero_and_one_to_one(mini_root):
    index = load_celeba_index(mini_root)
    row = (mini_root / "Anno/list_attr_celeba.txt").read_text().splitlines()[2 + 7].split()
    assert row[0] == index.filenames[7]
    assert index.labels[7].tolist() == [1 if v == "1" else 0 for v in row[1:]]


def test_parser_accepts_variable_whitespace_and_windows_line_ends(copy_root):
    attr = copy_root / "Anno/list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[2] = "\t".join(lines[2].split()) + "   "
    attr.write_text("\r\n".join(lines) + "\r\n\r\n")
    assert load_celeba_index(copy_root).labels.shape == (NUM_IMAGES, 40)


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (
            1,
            "31",
            "the count line says 31 images but the file has 30 rows",
        ),
        (2, " ".join(CELEBA_ATTRIBUTES[:39]), "expected the 40 CelebA attribute names, got 39"),
        (
            5,
            "000003.jpg " + " ".join(["1"] * 39),
            "expected an image name and 40 values \\(41 columns\\), got 40",
        ),
        (
            5,
            "000003.jpg 0 " + " ".join(["1"] * 39),
            "column 2 \\(5_o_Clock_Shadow\\) must be -1 or 1, got '0'",
        ),
    ],
)
def test_malformed_attribute_file_names_file_and_line(copy_root, line, text, message):
    attr = copy_root / "Anno/list_attr_celeba.txt"
    _replace_line(attr, line, text)
    with pytest.raises(CelebAFormatError, match=message) as info:
        load_celeba_index(copy_root)
    assert str(info.value).startswith(f"{attr}:{line}: ")
    assert info.value.line == line


def test_malformed_partition_file_names_file_and_line(copy_root):
    partition = copy_root / "Eval/list_eval_partition.txt"
    _replace_line(partition, 4, "000004.jpg 3")
    with pytest.raises(
        CelebAFormatError, match=f"^{partition}:4: partition must be 0 \\(train\\), 1 \\(val\\) or 2"
    ):
        load_celeba_index(copy_root)


def test_images_missing_from_the_partition_file_are_reported(copy_root):
    partition = copy_root / "Eval/list_eval_partition.txt"
    _replace_line(partition, 6, "")
    with pytest.raises(
        CelebAFormatError, match="list_attr_celeba.txt:8: 000006.jpg has no row in .*partition"
    ):
        load_celeba_index(copy_root)


def test_missing_image_names_the_image_and_the_line(copy_root):
    (copy_root / "Img/img_align_celeba/000009.jpg").unlink()
    with pytest.raises(
        DataFileNotFoundError, match="000009.jpg: missing image \\(listed on line 11 of .*list_attr"
    ):
        load_celeba_index(copy_root)


def test_missing_root_or_layout_names_the_path(tmp_path, copy_root):
    with pytest.raises(DataFileNotFoundError, match=str(tmp_path / "nope")):
        load_celeba_index(tmp_path / "nope")
    with pytest.raises(DataFileNotFoundError, match="no CelebA layout under .*Anno/list_attr_celeba.txt"):
        load_celeba_index(tmp_path)
    (copy_root / "Eval/list_eval_partition.txt").unlink()
    with pytest.raises(
        DataFileNotFoundError, match="list_eval_partition.txt: missing \\(official CelebA layout"
    ):
        load_celeba_index(copy_root)


def test_annotation_file_that_is_not_text_names_file_and_line(copy_root):
    attr = copy_root / "Anno/list_attr_celeba.txt"
    lines = attr.read_bytes().split(b"\n")
    lines[3] = lines[3][:10] + b"\xff\xfe" + lines[3][10:]
    attr.write_bytes(b"\n".join(lines))
    with pytest.raises(CelebAFormatError, match=f"^{attr}:4: not UTF-8 text"):
        load_celeba_index(copy_root)


def test_conversion_writes_shards_and_manifest(mini_root, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["attributes"] == list(CELEBA_ATTRIBUTES) and manifest["image_size"] is None
    assert {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")} == {
        "train": 24,
        "val": 3,
        "test": 3,
    }
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(6)]
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    )
    assert not [p for p in shards.parent.iterdir() if p.name.startswith(".")]  # staging removed
    with tarfile.open(shards / "train-000001.tar") as tar:
        members = tar.getnames()
        assert members[:2] == ["000005.cls.npy", "000005.jpg"] and len(members) == 8
        jpeg = tar.extractfile("000005.jpg").read()
        labels = np.load(io.BytesIO(tar.extractfile("000005.cls.npy").read()))
    assert jpeg == (mini_root / "Img/img_align_celeba/000005.jpg").read_bytes()
    assert labels.tolist() == load_celeba_index(mini_root).labels[4].tolist()


def test_resized_conversion_replaces_an_earlier_one(mini_root, tmp_path):
    out = tmp_path / "wds"
    convert_celeba(mini_root, out, shard_size=100)
    assert (out / "val-000000.tar").exists()
    convert_celeba(mini_root, out, image_size=12, shard_size=10, splits=("test", "train"))
    manifest = read_manifest(out)
    assert (
        manifest.image_size == 12
        and manifest.stats_split == "train"
        and set(manifest.splits) == {"train", "test"}
    )
    assert [s.count for s in manifest.shards("train")] == [10, 10, 4]
    assert not (out / "val-000000.tar").exists()  # nothing of the earlier conversion survives
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 20
    with tarfile.open(out / "test-000000.tar") as tar:
        assert Image.open(io.BytesIO(tar.extractfile("000028.jpg").read())).size == (12, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wds"]


def test_failed_conversion_leaves_the_earlier_output_untouched(copy_root, tmp_path):
    out = tmp_path / "out" / "wds"
    convert_celeba(copy_root, out, shard_size=100)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (copy_root / "Img/img_align_celeba/000010.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="000010.jpg: not a readable image"):
        convert_celeba(copy_root, out, shard_size=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["wds"]


def test_conversion_refuses_to_replace_an_unrelated_directory(mini_root, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        convert_celeba(mini_root, tmp_path)
    with pytest.raises(ValueError, match="splits: expected distinct names among train, val, test"):
        convert_celeba(mini_root, tmp_path / "x", splits=("train", "dev"))


def test_build_dataset_reads_shards_in_manifest_order(mini_root, shards):
    train, test = build_dataset("celeba", seed=0, path=str(shards), image_size=16)
    index = load_celeba_index(mini_root)
    assert (
        train.x.shape == (24, 3, 16, 16) and train.x.dtype == torch.float32 and test.x.shape == (3, 3, 16, 16)
    )
    assert [t.name for t in train.tasks] == list(CELEBA_ATTRIBUTES) and {
        t.num_classes for t in train.tasks
    } == {2}
    assert torch.equal(train.y, torch.from_numpy(index.labels[index.split_indices("train")]).long())
    assert torch.equal(test.y, torch.from_numpy(index.labels[index.split_indices("test")]).long())
    assert train.x.mean(dim=(0, 2, 3)).abs().max() < 0.1  # normalised with the train-split statistics
    val, _ = build_dataset("celeba", seed=0, path=str(shards), image_size=8, max_samples=5, test_split="val")
    assert val.x.shape == (5, 3, 8, 8) and torch.equal(val.y, train.y[:5])


def test_build_dataset_celeba_path_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"^data.path: no such directory: {tmp_path / 'absent'}$"):
        build_dataset("celeba", seed=0, path=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
        build_dataset("celeba", seed=0, path=str(tmp_path))
    for path in (None, ""):
        with pytest.raises(ConfigError, match="^data.path: celeba needs the directory of shards"):
            build_dataset("celeba", seed=0, path=path)
    with pytest.raises(ConfigError, match="^data.image_size: expected an integer >= 1, got 0"):
        build_dataset("celeba", seed=0, path=str(tmp_path), image_size=0)


def _fingerprints(stream) -> list[bytes]:
    return [x.numpy().tobytes() + y.numpy().tobytes() for x, y in stream]


def test_same_replica_index_reads_identical_sequences_and_replicas_are_disjoint(shards):
    manifest = read_manifest(shards)
    kwargs = {"num_replicas": 3, "image_size": 8}
    first = _fingerprints(iter_celeba_shards(shards, "train", replica_index=1, **kwargs))
    second = _fingerprints(iter_celeba_shards(shards, "train", replica_index=1, **kwargs))
    assert first == second and len(first) == 8
    assert replica_shards(manifest, "train", replica_index=1, num_replicas=3) == (
        "train-000001.tar",
        "train-000004.tar",
    )
    per_replica = [
        _fingerprints(iter_celeba_shards(shards, "train", replica_index=r, **kwargs)) for r in range(3)
    ]
    everything = _fingerprints(
        iter_celeba_shards(shards, "train", replica_index=0, num_replicas=1, image_size=8)
    )
    assert sum(len(p) for p in per_replica) == len(everything) == 24
    assert set().union(*map(set, per_replica)) == set(everything)
    assert not set(per_replica[0]) & set(per_replica[1]) and not set(per_replica[1]) & set(per_replica[2])
    shuffled = [
        _fingerprints(iter_celeba_shards(shards, "train", replica_index=0, seed=7, **kwargs)) for _ in "ab"
    ]
    assert shuffled[0] == shuffled[1] and sorted(shuffled[0]) == sorted(per_replica[0])


def test_reader_checks_arguments_and_shards_before_reading(shards, tmp_path):
    with pytest.raises(ValueError, match="split 'val' has 1 shards but 2 replicas read it.*shard_size <= 1"):
        iter_celeba_shards(shards, "val", replica_index=0, num_replicas=2)
    with pytest.raises(ValueError, match="replica_index must be in \\[0, 2\\), got 2"):
        iter_celeba_shards(shards, "train", replica_index=2, num_replicas=2)
    broken = Path(shutil.copytree(shards, tmp_path / "broken"))
    (broken / "train-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000002.tar is listed but missing"):
        iter_celeba_shards(broken, "train", replica_index=0, num_replicas=2)
    with pytest.raises(
        ValueError, match="split 'dev' is not in manifest.json; converted splits: train, val, test"
    ):
        iter_celeba_shards(shards, "dev", replica_index=0, num_replicas=1)
