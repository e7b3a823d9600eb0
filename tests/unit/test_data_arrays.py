"""`convert_arrays` / `dist-mtl data arrays`: your own .npy inputs and .npz/.csv labels as shards.

Shards are read back with tarfile (and webdataset), independently of the project's reader: inputs
byte-exact, labels with -1 for missing, splits seeded and disjoint, statistics equal to numpy's; every
bad input is a DataError/ConfigError naming the file and the position, and leaves no output.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from dist_mtl.cli import main
from dist_mtl.data import arrays_convert
from dist_mtl.data.arrays_convert import (
    DEFAULT_SHARD_BYTES,
    MIN_SHARDS,
    convert_arrays,
    default_shard_size,
    load_inputs,
)
from dist_mtl.data.manifest import read_manifest
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.errors import ConfigError, DataError

N = 60


def _read_split(out: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (input, labels)} of every sample of ``split``, in shard order, read with tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
            keys = list(dict.fromkeys(name.split(".", 1)[0] for name in names))
            assert len(keys) == shard["count"] and len(names) == 2 * shard["count"]
            for key in keys:
                x = np.load(io.BytesIO(tar.extractfile(f"{key}.npy").read()), allow_pickle=False)
                y = np.load(io.BytesIO(tar.extractfile(f"{key}.cls.npy").read()), allow_pickle=False)
                samples[key] = (x, y)
    return samples


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def uint8_data(tmp_path) -> tuple[Path, Path, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N, 3, 5, 4), dtype=np.uint8)
    labels = {
        "smile": rng.integers(-1, 2, size=N),  # some missing
        "age": rng.integers(0, 5, size=N).astype(np.int16),  # 5 classes
        "glasses": np.where(np.arange(N) % 2 == 0, 1, -1).astype(np.int8),  # half missing, only class 1
    }
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "y.npz", **labels)
    return tmp_path / "x.npy", tmp_path / "y.npz", x, labels


def test_uint8_round_trip_with_seeded_fractions(uint8_data, tmp_path):
    inputs, labels_path, x, labels = uint8_data
    out = tmp_path / "out"
    path = convert_arrays(
        inputs, labels_path, out, test_fraction=0.2, val_fraction=0.1, seed=3, shard_size=7, progress=False
    )
    assert path == out / "manifest.json"
    manifest = read_manifest(out)  # validates keys, counts, byte sizes and labelled counts
    assert [(t.name, t.num_classes) for t in manifest.tasks] == [("smile", 2), ("age", 5), ("glasses", 2)]
    assert (manifest.input_key, manifest.input_shape, manifest.input_dtype) == ("npy", (3, 5, 4), "uint8")
    assert list(manifest.splits) == ["train", "val", "test"] and manifest.stats_split == "train"
    assert [manifest.count(s) for s in ("train", "val", "test")] == [42, 6, 12]
    assert [s.count for s in manifest.shards("train")] == [7] * 6
    stacked = np.stack(list(labels.values()), axis=1)
    rows = {}
    for split in ("train", "val", "test"):
        samples = _read_split(out, split)
        rows[split] = [int(key) for key in samples]
        assert rows[split] == sorted(rows[split]) and all(len(key) == 6 for key in samples)
        for key, (xi, yi) in samples.items():
            assert xi.dtype == np.uint8 and xi.tobytes() == x[int(key)].tobytes() and xi.shape == (3, 5, 4)
            assert yi.dtype == np.int8 and yi.tolist() == stacked[int(key)].tolist()
        labelled = (stacked[rows[split]] >= 0).sum(axis=0).tolist()
        assert list(manifest.split(split).labelled) == labelled
    assert sorted(rows["train"] + rows["val"] + rows["test"]) == list(range(N))  # disjoint, complete
    train = x[rows["train"]].astype(np.float64) / 255
    assert np.allclose(manifest.mean, train.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(manifest.std, train.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    # The same seed draws the same rows; another seed others.
    again = convert_arrays(
        inputs, labels_path, tmp_path / "again", test_fraction=0.2, val_fraction=0.1, seed=3
    )
    assert [int(k) for k in _read_split(again.parent, "test")] == rows["test"]
    other = convert_arrays(
        inputs, labels_path, tmp_path / "other", test_fraction=0.2, val_fraction=0.1, seed=4
    )
    assert [int(k) for k in _read_split(other.parent, "test")] != rows["test"]
    # webdataset reads the shards as written: keys and fields.
    urls = [str(out / s.name) for s in manifest.shards("test")]
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert [int(k) for k in keys] == rows["test"]


def test_float32_round_trip_with_test_files_and_csv_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 2, 3, 3)).astype(np.float32)
    x[0, 0, 0, :] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]  # signed zero, subnormal, max
    x_test = rng.normal(size=(9, 2, 3, 3)).astype(">f4")  # big-endian: the values are kept
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x_test.npy", x_test)
    y = rng.integers(0, 3, size=(N, 2))
    csv_rows = [f"{a},{b}" for a, b in y]
    csv_rows[4] = f"{y[4, 0]},"  # empty cell: no label
    (tmp_path / "y.csv").write_text("left,right\n" + "\n".join(csv_rows) + "\n")
    # The test labels name the same tasks in another order; 7 is a class the train split never has.
    test_rows = ["right,left"] + [f"{i % 3},{7 if i == 2 else i % 2}" for i in range(9)]
    (tmp_path / "y_test.csv").write_text("\n".join(test_rows) + "\n")
    out = tmp_path / "out"
    convert_arrays(
        tmp_path / "x.npy",
        tmp_path / "y.csv",
        out,
        test_inputs=tmp_path / "x_test.npy",
        test_labels=tmp_path / "y_test.csv",
        progress=False,
    )
    manifest = read_manifest(out)
    assert [(t.name, t.num_classes) for t in manifest.tasks] == [("left", 8), ("right", 3)]
    assert manifest.input_dtype == "float32" and list(manifest.splits) == ["train", "test"]
    train = _read_split(out, "train")
    assert list(train) == [f"{i:06d}" for i in range(N)]
    for i, (xi, yi) in enumerate(train.values()):
        assert xi.dtype == np.float32 and xi.tobytes() == x[i].tobytes()
        assert yi.tolist() == ([y[i, 0], -1] if i == 4 else y[i].tolist())
    test = _read_split(out, "test")
    assert list(test) == [f"{i:06d}" for i in range(9)]  # keys: rows of the test file
    for i, (xi, yi) in enumerate(test.values()):
        assert xi.dtype == np.dtype("<f4") and np.array_equal(xi, x_test[i])
        assert yi.tolist() == [7 if i == 2 else i % 2, i % 3]  # reordered to the train file's tasks
    assert list(manifest.split("train").labelled) == [N, N - 1]
    assert np.allclose(manifest.mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(manifest.std, x.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-12)


def test_statistics_over_many_chunks_match_numpy_for_large_offsets(tmp_path, monkeypatch):
    """Chunked float64 statistics stay exact where mean-of-squares would cancel (mean 1e4, std 1e-2)."""
    monkeypatch.setattr(arrays_convert, "_CHUNK_VALUES", 50)  # 2 samples per chunk: many combinations
    rng = np.random.default_rng(2)
    x = (1e4 + 1e-2 * rng.normal(size=(41, 3, 4, 2))).astype(np.float32)
    x[:, 2] = 5.0  # a constant channel: std 1, so normalising only shifts it
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "y.npz", t=np.arange(41) % 2)
    convert_arrays(
        tmp_path / "x.npy", tmp_path / "y.npz", tmp_path / "out", test_fraction=0.25, progress=False
    )
    manifest = read_manifest(tmp_path / "out")
    train = x[[int(k) for k in _read_split(tmp_path / "out", "train")]].astype(np.float64)
    assert len(train) == 31
    assert np.allclose(manifest.mean, train.mean(axis=(0, 2, 3)), rtol=1e-14)
    assert np.allclose(manifest.std[:2], train.std(axis=(0, 2, 3))[:2], rtol=1e-9)
    assert manifest.std[2] == 1.0


def test_single_channel_inputs_are_stored_with_one_channel(tmp_path):
    x = np.arange(20 * 4 * 3, dtype=np.uint8).reshape(20, 4, 3)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "y.npz", digit=np.arange(20) % 4)
    convert_arrays(
        tmp_path / "x.npy", tmp_path / "y.npz", tmp_path / "out", test_fraction=0.5, progress=False
    )
    manifest = read_manifest(tmp_path / "out")
    assert manifest.input_shape == (1, 4, 3) and manifest.channels == 1
    for key, (xi, _) in _read_split(tmp_path / "out", "train").items():
        assert xi.shape == (1, 4, 3) and np.array_equal(xi[0], x[int(key)])


def test_inputs_are_memory_mapped(uint8_data):
    assert isinstance(load_inputs(uint8_data[0]).array, np.memmap)


def test_csv_forms_empty_cells_floats_whitespace_bom_crlf_and_blank_lines(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 1, 1), dtype=np.uint8))
    text = "\ufeff a , b\r\n1,0\r\n\r\n 2.0 , -1\r\n,1\r\n0,\r\n"
    (tmp_path / "y.csv").write_bytes(text.encode("utf-8"))
    (tmp_path / "t.csv").write_text("b,a\n1,0\n0,1\n1,1\n0,0\n")
    out = tmp_path / "out"
    files = {"test_inputs": tmp_path / "x.npy", "test_labels": tmp_path / "t.csv"}
    convert_arrays(tmp_path / "x.npy", tmp_path / "y.csv", out, progress=False, **files)
    train = {int(k): y.tolist() for k, (_, y) in _read_split(out, "train").items()}
    assert train == {0: [1, 0], 1: [2, -1], 2: [-1, 1], 3: [0, -1]}
    assert [(t.name, t.num_classes) for t in read_manifest(out).tasks] == [("a", 3), ("b", 2)]


def test_default_shard_size_targets_tens_of_megabytes_and_at_least_min_shards():
    big = (3, 512, 512)  # 3 MB as float32
    per_sample = -(-(128 + 3 * 512 * 512 * 4) // 512) * 512 + 1536
    assert default_shard_size(big, np.dtype(np.float32), 100_000) == DEFAULT_SHARD_BYTES // per_sample == 10
    assert default_shard_size((3, 32, 32), np.dtype(np.uint8), 50_000) == -(-50_000 // MIN_SHARDS)
    assert default_shard_size((3, 32, 32), np.dtype(np.uint8), 5_000_000) == DEFAULT_SHARD_BYTES // 5120
    assert default_shard_size((1, 1, 1), np.dtype(np.uint8), 3) == 1


def test_default_shards_hold_what_the_estimate_says(tmp_path):
    x = np.zeros((64, 3, 16, 16), dtype=np.float32)  # 3 KB + 128 B header per sample
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "y.npz", t=np.arange(64) % 2)
    convert_arrays(
        tmp_path / "x.npy", tmp_path / "y.npz", tmp_path / "out", test_fraction=0.5, progress=False
    )
    manifest = read_manifest(tmp_path / "out")
    assert [s.count for s in manifest.shards("train")] == [2] * 16  # ceil(32 / MIN_SHARDS)
    estimate = -(-(128 + 3 * 16 * 16 * 4) // 512) * 512 + 1536
    for shard in manifest.shards("train"):  # plus the tar end: two zero blocks, padded to 10 KB records
        assert shard.count * estimate <= shard.bytes <= shard.count * estimate + 10240


def test_replacing_an_earlier_conversion_and_refusing_an_unrelated_directory(uint8_data, tmp_path):
    inputs, labels, _, _ = uint8_data
    out = tmp_path / "out"
    convert_arrays(inputs, labels, out, test_fraction=0.5, shard_size=5, progress=False)
    assert "train-000005.tar" in _listing(out)
    convert_arrays(inputs, labels, out, test_fraction=0.5, shard_size=30, progress=False)
    assert _listing(out) == ["manifest.json", "test-000000.tar", "train-000000.tar"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="mine: not empty and holds no manifest.json; refusing to replace it"):
        convert_arrays(inputs, labels, tmp_path / "mine", test_fraction=0.5)
    assert _listing(tmp_path / "mine") == ["keep.txt"]


def test_a_failure_while_writing_leaves_the_earlier_output_untouched(uint8_data, tmp_path, monkeypatch):
    inputs, labels, _, _ = uint8_data
    out = tmp_path / "out"
    convert_arrays(inputs, labels, out, test_fraction=0.5, shard_size=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    original = arrays_convert.encode_npy

    def failing(array: np.ndarray) -> bytes:
        calls.append(1)
        if len(calls) == 25:  # half way through the train split, in its ninth shard
            raise OSError("disk full")
        return original(array)

    monkeypatch.setattr(arrays_convert, "encode_npy", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_arrays(inputs, labels, out, test_fraction=0.2, shard_size=3, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _listing(tmp_path) == ["out", "x.npy", "y.npz"]  # no staging directory left


# ---- errors: each names the file and the position, and leaves no output ----


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _setup(tmp_path: Path, n: int = 10) -> Path:
    np.save(tmp_path / "x.npy", np.zeros((n, 1, 2, 2), dtype=np.uint8))
    return tmp_path / "x.npy"


def _expect_error(tmp_path: Path, error: type[Exception], message: str, labels: Path, **kwargs) -> None:
    kwargs.setdefault("test_fraction", 0.3)
    out = tmp_path / "out"
    with pytest.raises(error, match="^" + message):
        convert_arrays(kwargs.pop("inputs", tmp_path / "x.npy"), labels, out, progress=False, **kwargs)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"a": np.array([0, 1, 0.5, 1, 0, 1, 0, 1, 0, 1])},
            "{y}: task 'a', index 2: expected an integer >= -1",
        ),
        ({"a": np.array(list("0101010101"))}, "{y}: task 'a': expected integer labels, got dtype <U1"),
        (
            {"a": np.array([0, 1, 0, -2, 0, 1, 0, 1, 0, 1])},
            "{y}: task 'a', index 3: expected an integer >= -1",
        ),
        ({"a": np.arange(10) % 2, "b": np.arange(9) % 2}, "{y}: task 'b': 9 labels but {x} holds 10 samples"),
        ({"a": np.zeros((10, 2), dtype=int)}, "{y}: task 'a': expected a 1-D array of 10 labels"),
        ({}, "{y}: holds no arrays; expected one integer label array per task"),
        (
            {"a": np.arange(10) % 2, "b": np.array([-1] * 9 + [1])},
            "{y}: task 'b' has no labelled sample in split '(train|test)'",
        ),
    ],
)
def test_bad_npz_labels(tmp_path, arrays, message):
    x = _setup(tmp_path)
    y = _save_npz(tmp_path / "y.npz", **arrays)
    _expect_error(tmp_path, DataError, message.format(x=re.escape(str(x)), y=re.escape(str(y))), y)


def test_duplicate_npz_names_and_unreadable_npz(tmp_path):
    _setup(tmp_path)
    y = tmp_path / "y.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.arange(10) % 2)
    with zipfile.ZipFile(y, "w") as archive:
        archive.writestr("a.npy", buffer.getvalue())
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("a.npy", buffer.getvalue())
    _expect_error(tmp_path, DataError, re.escape(f"{y}: task name 'a' appears twice (arrays 1 and 2)"), y)
    y.write_bytes(b"not a zip")
    _expect_error(tmp_path, DataError, re.escape(f"{y}: not a readable .npz archive"), y)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a,b\n" + "0,1\n" * 3 + "0,x\n" + "1,0\n" * 6,
            "{y}: line 5, column 'b': expected an integer >= -1 or an empty cell",
        ),
        (
            "a,b\n" + "0,1\n" * 5 + "-3,1\n" + "1,0\n" * 4,
            "{y}: line 7, column 'a': expected an integer >= -1 \\(-1 or empty",
        ),
        ("a,b\n" + "0,1\n" * 2 + "1.5,0\n" + "1,0\n" * 7, "{y}: line 4, column 'a': expected an integer"),
        (
            "a,b\n" + "0,1\n" * 3 + "0,1,1\n" + "1,0\n" * 6,
            "{y}: line 5: expected 2 cells \\(one per task: a, b\\), got 3",
        ),
        ("a,b\n" + "0,1\n" * 9, "{y}: 9 label rows but {x} holds 10 samples \\(blank lines are skipped"),
        ("a,b\n" + "0,1\n" * 11, "{y}: line 12: more label rows than the 10 samples of {x}"),
        ("a,b,a\n" + "0,1,1\n" * 10, "{y}: task name 'a' appears twice \\(columns 1 and 3\\)"),
        ("a,,b\n" + "0,1,1\n" * 10, "{y}: line 1, column 2: empty task name"),
        ("", "{y}: line 1: expected a header of task names"),
        (
            "a,b\n" + "0,1\n" + "-1,1\n" * 9,
            "{y}: task 'a' has no labelled sample in split '(train|test)'",
        ),
    ],
)
def test_bad_csv_labels(tmp_path, text, message):
    x = _setup(tmp_path)
    y = tmp_path / "y.csv"
    y.write_text(text)
    _expect_error(tmp_path, DataError, message.format(x=re.escape(str(x)), y=re.escape(str(y))), y)


def test_csv_that_is_not_utf8_names_its_line(tmp_path):
    _setup(tmp_path)
    y = tmp_path / "y.csv"
    y.write_bytes(b"a\n0\n1\n\xff\n" + b"1\n" * 7)
    _expect_error(tmp_path, DataError, re.escape(f"{y}: line 4: not UTF-8 text"), y)


def test_missing_label_in_the_test_split_only_names_the_test_split(tmp_path):
    x = _setup(tmp_path)
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2, b=np.arange(10) % 2)
    np.save(tmp_path / "xt.npy", np.zeros((3, 1, 2, 2), dtype=np.uint8))
    yt = _save_npz(tmp_path / "yt.npz", b=np.array([0, 1, 0]), a=np.array([-1, -1, -1]))
    message = re.escape(f"{yt}: task 'a' has no labelled sample in split 'test' (all 3 are -1)")
    _expect_error(
        tmp_path,
        DataError,
        message,
        y,
        inputs=x,
        test_fraction=None,
        test_inputs=tmp_path / "xt.npy",
        test_labels=yt,
    )


def test_test_files_must_match_the_train_files(tmp_path):
    _setup(tmp_path)
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2, b=np.arange(10) % 2)
    np.save(tmp_path / "xt.npy", np.zeros((3, 1, 2, 2), dtype=np.uint8))
    yt = _save_npz(tmp_path / "yt.npz", a=np.array([0, 1, 0]), c=np.array([0, 1, 0]))
    files = {"test_fraction": None, "test_inputs": tmp_path / "xt.npy", "test_labels": yt}
    _expect_error(
        tmp_path,
        DataError,
        re.escape(f"{yt}: tasks differ from those of {y}: missing ['b'], extra ['c']"),
        y,
        **files,
    )
    np.save(tmp_path / "xt.npy", np.zeros((3, 1, 2, 3), dtype=np.uint8))
    _save_npz(yt, a=np.array([0, 1, 0]), b=np.array([0, 1, 0]))
    message = re.escape(f"{tmp_path / 'xt.npy'}: samples of shape [1, 2, 3] and dtype uint8, but those of")
    _expect_error(tmp_path, DataError, message, y, **files)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((10, 1, 2, 2), dtype=np.int64), "dtype int64; inputs must be uint8 or float32"),
        (np.zeros((10, 4), dtype=np.uint8), re.escape("shape (10, 4); expected (N, C, H, W), or (N, H, W)")),
        (np.zeros((0, 1, 2, 2), dtype=np.uint8), re.escape("shape (0, 1, 2, 2); expected")),
        (np.array([{"a": 1}] * 10, dtype=object), "not a readable .npy array"),
    ],
)
def test_bad_inputs(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array, allow_pickle=True)
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2)
    _expect_error(tmp_path, DataError, re.escape(str(tmp_path / "x.npy")) + ": " + message, y)


def test_inputs_that_are_missing_an_npz_or_not_numpy(tmp_path):
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2)
    x = tmp_path / "x.npy"
    _expect_error(tmp_path, DataFileNotFoundError, re.escape(f"{x}: inputs file missing"), y)
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 1, 2, 2), dtype=np.uint8))
    (tmp_path / "x.npz").rename(x)
    _expect_error(tmp_path, DataError, re.escape(f"{x}: an .npz archive; inputs must be one .npy array"), y)
    x.write_bytes(b"garbage")
    _expect_error(tmp_path, DataError, re.escape(f"{x}: not a readable .npy array"), y)
    _setup(tmp_path)
    _expect_error(
        tmp_path,
        DataFileNotFoundError,
        re.escape(f"{tmp_path / 'none.csv'}: labels file missing"),
        tmp_path / "none.csv",
    )
    (tmp_path / "y.txt").write_text("a\n")
    _expect_error(
        tmp_path, DataError, re.escape(f"{tmp_path / 'y.txt'}: labels must be an .npz"), tmp_path / "y.txt"
    )


@pytest.mark.parametrize(("value", "what"), [(np.nan, "NaN"), (-np.inf, "an infinity")])
def test_non_finite_float_input_names_file_and_first_sample(tmp_path, monkeypatch, value, what):
    monkeypatch.setattr(arrays_convert, "_CHUNK_VALUES", 8)  # 2 samples per chunk: the bad one is in chunk 4
    x = np.zeros((10, 1, 2, 2), dtype=np.float32)
    x[7, 0, 1, 1] = value
    x[9, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2)
    message = re.escape(f"{tmp_path / 'x.npy'}: sample 7 holds {what}; float inputs must be finite")
    _expect_error(tmp_path, DataError, message, y)
    np.save(tmp_path / "x.npy", np.zeros((10, 1, 2, 2), dtype=np.float32))  # now the test file is bad
    np.save(tmp_path / "xt.npy", x[5:])
    yt = _save_npz(tmp_path / "yt.npz", a=np.arange(5) % 2)
    message = re.escape(f"{tmp_path / 'xt.npy'}: sample 2 holds {what}")
    _expect_error(
        tmp_path, DataError, message, y, test_fraction=None, test_inputs=tmp_path / "xt.npy", test_labels=yt
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": None}, "test_inputs/test_labels or test_fraction: one is needed"),
        (
            {"test_fraction": 0.2, "test_inputs": "a.npy", "test_labels": "b.npz"},
            "test_fraction: give either",
        ),
        ({"test_fraction": None, "test_inputs": "a.npy"}, "test_inputs and test_labels: give both"),
        ({"test_fraction": 1.0}, "test_fraction: expected a number in (0, 1), got 1.0"),
        ({"test_fraction": True}, "test_fraction: expected a number in (0, 1), got True"),
        ({"val_fraction": 0}, "val_fraction: expected a number in (0, 1), got 0"),
        ({"val_fraction": 0.7}, "test_fraction + val_fraction: expected less than 1, got 0.3 + 0.7"),
        ({"test_fraction": 0.01}, "test_fraction: 0.01 of the 10 samples of"),
        (
            {"test_fraction": 0.5, "val_fraction": 0.48},
            "test_fraction/val_fraction: they take all 10 samples",
        ),
        ({"seed": -1}, "seed: expected an integer >= 0, got -1"),
        ({"shard_size": 0}, "shard_size: expected an integer >= 1, got 0"),
    ],
)
def test_argument_errors_are_config_errors(tmp_path, kwargs, message):
    _setup(tmp_path)
    y = _save_npz(tmp_path / "y.npz", a=np.arange(10) % 2)
    _expect_error(tmp_path, ConfigError, re.escape(message), y, **kwargs)


def test_cli_converts_and_reports_errors_in_one_line(uint8_data, tmp_path, capsys):
    inputs, labels, _, _ = uint8_data
    out = tmp_path / "cli"
    args = ["data", "arrays", "--inputs", str(inputs), "--labels", str(labels), "--out", str(out)]
    assert (
        main([*args, "--test-fraction", "0.25", "--val-fraction", "0.1", "--seed", "2", "--shard-size", "4"])
        == 0
    )
    assert f"wrote {out / 'manifest.json'}" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert [manifest.count(s) for s in ("train", "val", "test")] == [39, 6, 15]
    assert [s.count for s in manifest.shards("val")] == [4, 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("dist-mtl: error: test_inputs/test_labels or test_fraction") and "Traceback" not in err
    )
    np.save(inputs, np.zeros((N, 2), dtype=np.uint8))
    assert main([*args[:-1], str(tmp_path / "new"), "--test-fraction", "0.5"]) == 2
    assert f"dist-mtl: error: {inputs}: shape ({N}, 2)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
