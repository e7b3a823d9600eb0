"""CelebA: layout parsing and its errors; conversion into `dist_mtl-shards/1` shards, read back directly."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_mtl.data.celeba_convert import convert_celeba
from dist_mtl.data.celeba_layout import CELEBA_ATTRIBUTES, CelebAFormatError, load_celeba_index
from dist_mtl.data.celeba_like import make_celeba_like_shards
from dist_mtl.data.celeba_miniature import make_celeba_miniature
from dist_mtl.data.images import decode_image, resize_square
from dist_mtl.data.manifest import read_manifest
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
    assert manifest["format"] == "dist_mtl-shards/1"
    assert manifest["tasks"] == [{"name": name, "classes": 2} for name in CELEBA_ATTRIBUTES]
    assert manifest["input"] == {"key": "jpg", "shape": None, "dtype": "uint8"}
    assert manifest["labels"] == {"key": "cls.npy"}
    assert {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")} == {
        "train": 24,
        "val": 3,
        "test": 3,
    }
    for split in manifest["splits"].values():  # CelebA labels every attribute of every image
        assert split["labelled"] == [split["count"]] * 40
        assert all(s["bytes"] == (shards / s["name"]).stat().st_size for s in split["shards"])
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
        labels = np.load(io.BytesIO(tar.extractfile("000005.cls.npy").read()), allow_pickle=False)
    assert jpeg == (mini_root / "Img/img_align_celeba/000005.jpg").read_bytes()
    assert labels.dtype == np.int8 and labels.tolist() == load_celeba_index(mini_root).labels[4].tolist()
    read_manifest(shards)  # the generic reader accepts it: counts, byte sizes, labelled counts


def _stored_pixels(directory: Path, split: str) -> np.ndarray:
    """uint8 (N, 3, H, W) of every image of ``split``, decoded from the shards with webdataset."""
    urls = [str(directory / s.name) for s in read_manifest(directory).shards(split)]
    images = [np.asarray(sample["jpg"]) for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8")]
    return np.stack(images).transpose(0, 3, 1, 2)


def test_normalisation_is_measured_on_the_train_images_as_stored(mini_root, shards, tmp_path):
    manifest = read_manifest(shards)
    train = _stored_pixels(shards, "train").astype(np.float64) / 255  # original JPEGs, decoded
    assert train.shape == (24, 3, 44, 36)
    assert np.allclose(manifest.mean, train.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(manifest.std, train.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    # Resized: the statistics of the resized images (before the JPEG re-encoding).
    convert_celeba(mini_root, tmp_path / "small", image_size=10, progress=False)
    index = load_celeba_index(mini_root)
    resized = np.stack(
        [
            np.asarray(resize_square(decode_image((index.layout.images_dir / name).read_bytes(), name), 10))
            for name in (index.filenames[row] for row in index.split_indices("train"))
        ]
    ).astype(np.float64)
    small = read_manifest(tmp_path / "small")
    assert small.input_shape == (3, 10, 10)
    assert np.allclose(small.mean, resized.mean(axis=(0, 1, 2)) / 255, rtol=0, atol=1e-12)
    assert np.allclose(small.std, resized.std(axis=(0, 1, 2)) / 255, rtol=0, atol=1e-12)
    stored = _stored_pixels(tmp_path / "small", "train").astype(np.float64) / 255
    assert np.allclose(small.mean, stored.mean(axis=(0, 2, 3)), atol=0.01)  # JPEG changes pixels a little


def test_resized_conversion_replaces_an_earlier_one(mini_root, tmp_path):
    out = tmp_path / "wds"
    convert_celeba(mini_root, out, shard_size=100)
    assert (out / "val-000000.tar").exists()
    convert_celeba(mini_root, out, image_size=12, shard_size=10, splits=("test", "train"))
    manifest = read_manifest(out)
    assert manifest.input_shape == (3, 12, 12) and manifest.stats_split == "train"
    assert list(manifest.splits) == ["test", "train"]
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


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} over every shard of ``directory``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def test_celeba_like_shards_are_what_converting_a_178x218_miniature_gives(tmp_path):
    like = make_celeba_like_shards(tmp_path / "like", 30, seed=2, image_size=16, shard_size=7)
    root = make_celeba_miniature(tmp_path / "root", num_images=30, seed=2, image_width=178, image_height=218)
    converted = convert_celeba(root, tmp_path / "converted", image_size=16, shard_size=7, progress=False)
    a, b = read_manifest(like.parent), read_manifest(converted.parent)
    assert (a.tasks, a.input_key, a.input_shape, a.stats_split) == (b.tasks, "jpg", (3, 16, 16), "train")
    assert {s: [(e.name, e.count) for e in a.shards(s)] for s in a.splits} == {
        s: [(e.name, e.count) for e in b.shards(s)] for s in b.splits
    }
    assert {s: a.split(s).labelled for s in a.splits} == {s: b.split(s).labelled for s in b.splits}
    assert np.allclose(a.mean, b.mean, atol=0.002) and np.allclose(a.std, b.std, rtol=0.1)
    ours, theirs = _samples(like.parent), _samples(converted.parent)
    assert sorted(ours) == sorted(theirs) == [f"{i:06d}" for i in range(1, 31)]
    for key in ours:
        assert ours[key]["cls.npy"] == theirs[key]["cls.npy"]  # the same labels, int8 0/1
        x, y = (np.asarray(Image.open(io.BytesIO(s[key]["jpg"])), dtype=np.float64) for s in (ours, theirs))
        assert (
            x.shape == y.shape == (16, 16, 3) and np.abs(x - y).mean() < 5
        )  # the same content, resized once
    assert np.abs(x - 128).mean() > 5  # (not two flat images)


def test_celeba_like_argument_errors_write_nothing(tmp_path):
    for kwargs, message in [
        ({"num_images": 2}, "num_images: expected an integer >= 3 (one per split), got 2"),
        ({"num_images": 10, "image_size": None}, "image_size: expected an integer >= 1, got None"),
        ({"num_images": 10, "shard_size": 0}, "shard_size: expected an integer >= 1, got 0"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            make_celeba_like_shards(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []
