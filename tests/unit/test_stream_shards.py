"""Shard directories written directly (webdataset TarWriter + write_manifest) for the stream tests, and
tests of the random-access shard index against webdataset's own reader.

``write_shards`` makes every sample recognisable from its pixels: channel 0 of pixel (0, 0) holds the
sample's ordinal modulo 256 and channel 1 (when there is one) the ordinal divided by 256, so a test can
tell which samples a batch holds by looking at x alone (the default normalisation is mean 0, std 1).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dist_mtl.data import TaskSpec, write_manifest
from dist_mtl.data.manifest import LABEL_KEY, MANIFEST_NAME, ShardEntry, ShardManifest, SplitEntry
from dist_mtl.data.shard_index import key_and_field, read_fields, shard_index, tar_members
from dist_mtl.errors import DataError

TASKS = (TaskSpec("left", 2), TaskSpec("right", 3), TaskSpec("colour", 5))


@dataclass
class Written:
    """A shard directory and what each split's samples hold, by ordinal (manifest order)."""

    directory: Path
    manifest: ShardManifest
    labels: dict[str, np.ndarray]  # split -> int64 (n, T)
    inputs: dict[str, list[np.ndarray]]  # split -> the stored array (npy) or decoded pixels (HWC / HW)


def sample_key(split: str, ordinal: int) -> str:
    return f"{split}{ordinal:05d}"


def _image(rng: np.random.Generator, ordinal: int, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    pixels = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
    pixels[0, 0, 0] = ordinal % 256
    if c > 1:
        pixels[0, 0, 1] = ordinal // 256
    return pixels[:, :, 0] if c == 1 else pixels


def _array(rng: np.random.Generator, ordinal: int, shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    if dtype == "float32":
        array = (rng.standard_normal(shape) * 3).astype(np.float32)
        array[0, 0, 0], array[min(1, shape[0] - 1), 0, 0] = 0, 0
        array[0, 0, 0] = ordinal
        return array
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    array[0, 0, 0] = ordinal % 256
    if shape[0] > 1:
        array[1, 0, 0] = ordinal // 256
    return array


def _encode(pixels: np.ndarray, key: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if key == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_shards(
    directory: Path,
    *,
    counts: dict[str, int] | None = None,
    shard_size: int | dict[str, int] = 8,
    tasks: tuple[TaskSpec, ...] = TASKS,
    input_key: str = "png",
    shape: tuple[int, int, int] | None = (3, 4, 4),
    dtype: str = "uint8",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int = 0,
) -> Written:
    """Write ``{split}-%06d.tar`` shards of ``shard_size`` samples per split plus the manifest.

    ``shape=None`` writes encoded images of varying sizes (7 x 5 and 5 x 6, RGB) as CelebA's originals.
    Labels are random in [-1, classes) with every task labelled at least once per split.
    """
    directory.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 40, "test": 10}
    rng = np.random.default_rng(seed)
    channels = 3 if shape is None else shape[0]
    splits, labels, inputs = {}, {}, {}
    for split, count in counts.items():
        size = shard_size[split] if isinstance(shard_size, dict) else shard_size
        y = np.stack([rng.integers(-1, t.num_classes, size=count) for t in tasks], axis=1).astype(np.int64)
        if count:
            y[0] = 0
        labels[split], inputs[split], entries = y, [], []
        for shard, start in enumerate(range(0, count, size)):
            name = f"{split}-{shard:06d}.tar"
            with wds.TarWriter(str(directory / name), mtime=0.0) as writer:
                for k in range(start, min(start + size, count)):
                    if input_key == "npy":
                        assert shape is not None
                        stored = _array(rng, k, shape, dtype)
                        data = _npy(stored)
                    else:
                        image_shape = shape or ((3, 7, 5) if k % 2 else (3, 5, 6))
                        stored = _image(rng, k, image_shape)
                        data = _encode(stored, input_key)
                    inputs[split].append(stored)
                    writer.write({"__key__": sample_key(split, k), input_key: data, LABEL_KEY: _npy(y[k])})
            entries.append(
                ShardEntry(name, min(start + size, count) - start, (directory / name).stat().st_size)
            )
        labelled = tuple(int((y[:, t] >= 0).sum()) for t in range(len(tasks)))
        splits[split] = SplitEntry(tuple(entries), labelled)
    manifest = ShardManifest(
        tasks=tasks,
        input_key=input_key,
        input_shape=shape,
        input_dtype=dtype,
        mean=mean or (0.0,) * channels,
        std=std or (1.0,) * channels,
        stats_split="train",
        splits=splits,
    )
    write_manifest(directory, manifest)
    return Written(directory, manifest, labels, inputs)


def refresh_sizes(directory: Path) -> None:
    """Set every listed shard's ``bytes`` to its file's size (after a test rewrote a shard on purpose)."""
    path = directory / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for split in raw["splits"].values():
        for shard in split["shards"]:
            shard["bytes"] = (directory / shard["name"]).stat().st_size
    path.write_text(json.dumps(raw))


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {member.name: member for member in tar.getmembers()}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Replace bytes in place: the file keeps its size, so the manifest's size check still passes."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def sample_ids(x: torch.Tensor, scale: float = 255.0) -> list[int]:
    """Ordinals of the samples of a batch written by ``write_shards`` with mean 0 and std 1.

    ``scale`` undoes the stream's division: 255 for uint8 inputs, 1 for float32 arrays.
    """
    pixel = (x[:, :, 0, 0].double() * scale).round().long()
    ids = pixel[:, 0] + (256 * pixel[:, 1] if x.shape[1] > 1 else 0)
    return ids.tolist()


# --- the index ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000001.jpg", ("000001", "jpg")),
        ("000001.cls.npy", ("000001", "cls.npy")),
        ("a/b.c/000001.JPG", ("a/b.c/000001", "jpg")),
        ("noextension", None),
        ("__key__", None),
        ("__meta__/x.json", None),
    ],
)
def test_member_names_split_as_webdataset_splits_them(name, expected):
    assert key_and_field(name) == expected


def test_index_reads_every_sample_exactly_as_webdataset_does(tmp_path):
    written = write_shards(tmp_path / "wds", counts={"train": 11}, shard_size=11)
    path = tmp_path / "wds" / "train-000000.tar"
    index = shard_index(path, ("png", LABEL_KEY), 11)
    reference = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [index.key(i) for i in range(len(index))] == [s["__key__"] for s in reference]
    read = dict(read_fields(index, [7, 2, 10]))
    for i in (7, 2, 10):
        assert read[i] == [reference[i]["png"], reference[i]["cls.npy"]]
    assert np.array_equal(np.load(io.BytesIO(read[2][1])), written.labels["train"][2])


def test_index_records_absent_fields_and_ignores_extra_ones(tmp_path):
    path = tmp_path / "odd.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "png": b"1", "json": b"{}"})
        writer.write({"__key__": "b", LABEL_KEY: b"2"})
    index = shard_index(path, ("png", LABEL_KEY), 2)
    assert dict(read_fields(index, [0, 1])) == {0: [b"1", None], 1: [None, b"2"]}


def test_index_counts_samples_against_the_manifest(tmp_path):
    write_shards(tmp_path / "wds", counts={"train": 5}, shard_size=5)
    path = tmp_path / "wds" / "train-000000.tar"
    with pytest.raises(
        DataError, match=f"^{path}: holds 5 samples but .*manifest.json lists 6 .*'train00004'"
    ):
        shard_index(path, ("png", LABEL_KEY), 6)


def test_index_refuses_a_field_twice_in_one_sample(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "a.PNG"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match=f"^{path}: sample 'a' holds field 'png' twice"):
        shard_index(path, ("png", LABEL_KEY), 1)


def test_index_is_rebuilt_when_the_file_changes(tmp_path):
    write_shards(tmp_path / "wds", counts={"train": 4}, shard_size=4)
    path = tmp_path / "wds" / "train-000000.tar"
    first = shard_index(path, ("png", LABEL_KEY), 4)
    assert shard_index(path, ("png", LABEL_KEY), 4) is first  # cached
    write_shards(tmp_path / "wds", counts={"train": 3}, shard_size=3, seed=1)
    assert len(shard_index(path, ("png", LABEL_KEY), 3)) == 3


@pytest.mark.parametrize("form", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_parser_agrees_with_tarfile(tmp_path, form):
    """Regular members with their data offsets and sizes, past directories, links, long and prefixed names."""
    path = tmp_path / "mixed.tar"
    names = ["a.png", "dir/b.cls.npy", "p" * 90 + "/" + "q" * 60 + ".png", "é.jpg", "empty.txt"]
    if form != tarfile.USTAR_FORMAT:
        names.append("long" * 40 + ".png")  # over 255 characters: GNU long name or pax path
    with tarfile.open(path, "w", format=form) as tar:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
        for i, name in enumerate(names):
            data = bytes(range(256)) * i + b"x" * (i * 100 % 7)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
    with open(path, "rb") as handle:
        assert list(tar_members(handle.fileno(), path.stat().st_size)) == expected
    assert [name for name, _, _ in expected] == names
