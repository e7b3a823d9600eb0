"""``ShardSource``: the streamed order, its determinism across workers and resumes, evaluation parts,
device normalisation, and the masking of corrupt samples.

Batches are identified by the ordinals ``write_shards`` plants in pixel (0, 0), so each property is
checked on which samples a batch holds, and on the exact tensors where bit-identity is the claim.
The module's directory: train 50 samples in 7 shards of 8 (the last holds 2), test 11 in shards of
4, 4, 3; tasks with 2, 3 and 5 classes; 4 x 4 RGB PNGs, stored at the size they are read.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_mtl.data import Batch, ShardSource, build_dataset, dataset_num_tasks, dataset_options
from dist_mtl.data import shard_index as shard_index_module
from dist_mtl.data.plan import epoch_order, shuffle_buffer, split_view
from dist_mtl.errors import ConfigError, DataError
from tests.unit.test_stream_shards import Written, members, overwrite, sample_ids, sample_key, write_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    directory = tmp_path_factory.mktemp("stream") / "wds"
    return write_shards(directory, counts={"train": 50, "test": 11}, shard_size={"train": 8, "test": 4})


@pytest.fixture
def copy(written, tmp_path) -> Path:
    """A private copy of the module's directory that a test may damage."""
    return Path(shutil.copytree(written.directory, tmp_path / "wds"))


def _batches(source: ShardSource, **kwargs) -> list[Batch]:
    options = {"seed": 3, "batch_size": 4, "part": (0, 1), "start_step": 0, "total_steps": 30, "device": CPU}
    return list(source.train_batches(**{**options, **kwargs}))


def _ids(batches: list[Batch]) -> list[list[int]]:
    return [sample_ids(b.x) for b in batches]


def _same(one: list[Batch], two: list[Batch]) -> bool:
    return len(one) == len(two) and all(
        torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.skipped == b.skipped
        for a, b in zip(one, two, strict=True)
    )


# --- order -------------------------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_epoch_and_part(written):
    view = split_view(written.manifest, "train", None)
    runs = {
        (seed, epoch, index): epoch_order(view, seed=seed, epoch=epoch, index=index, parts=2, buffer_size=5)
        for seed in (0, 1)
        for epoch in (0, 1)
        for index in (0, 1)
    }
    again = epoch_order(view, seed=1, epoch=1, index=0, parts=2, buffer_size=5)
    assert np.array_equal(runs[1, 1, 0], again)
    for index, shards in ((0, (0, 2, 4, 6)), (1, (1, 3, 5))):  # part r reads shards r, r + 2, ...
        expected = sorted(k for s in shards for k in range(8 * s, min(8 * s + 8, 50)))
        orders = [runs[seed, epoch, index].tolist() for seed in (0, 1) for epoch in (0, 1)]
        assert all(sorted(order) == expected for order in orders)  # every epoch visits each sample once
        assert len({tuple(order) for order in orders}) == 4  # seed and epoch both change the order


def test_shuffle_buffer_mixes_only_within_its_window():
    stream = np.arange(100)
    assert np.array_equal(shuffle_buffer(stream, 1, np.random.default_rng(0)), stream)  # size 1: no mixing
    out = shuffle_buffer(stream, 10, np.random.default_rng(0))
    assert sorted(out.tolist()) == list(range(100)) and not np.array_equal(out, stream)
    # The i-th emitted item is drawn from a buffer that has seen items 0 .. i + 9 only.
    assert all(out[i] <= i + 9 for i in range(90))
    assert np.array_equal(out, shuffle_buffer(stream, 10, np.random.default_rng(0)))


def test_parts_read_disjoint_whole_shards(written):
    source = ShardSource(written.directory, image_size=4, shuffle_buffer=6)
    assert source.steps_per_epoch(6, 3) == 8  # parts hold 18, 16, 16 samples; 2 a step each
    seen = []
    for index in range(3):  # 7 train shards over 3 parts: shards {0, 3, 6}, {1, 4}, {2, 5}
        batches = _batches(source, batch_size=6, part=(index, 3), total_steps=8)
        ids = [i for batch in _ids(batches) for i in batch]
        assert len(ids) == len(set(ids)) == 16 and {i // 8 for i in ids} <= set(range(index, 7, 3))
        seen.append(set(ids))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_ranks_with_the_same_part_and_seed_get_identical_batches(written):
    one = _batches(ShardSource(written.directory, image_size=4), part=(1, 2), batch_size=8)
    two = _batches(ShardSource(written.directory, image_size=4), part=(1, 2), batch_size=8)
    assert _same(one, two)
    other_seed = _batches(ShardSource(written.directory, image_size=4), part=(1, 2), batch_size=8, seed=4)
    assert _ids(one) != _ids(other_seed)


def test_steps_walk_epochs_in_drop_last_batches(written):
    source = ShardSource(written.directory, image_size=4, shuffle_buffer=3)
    assert source.train_count() == 50
    assert source.steps_per_epoch(4, 1) == 12  # 50 // 4
    assert source.steps_per_epoch(4, 2) == 12  # parts of 26 and 24 samples: min(13, 12)
    assert source.steps_per_epoch(8, 2) == 6  # min(26 // 4, 24 // 4)
    ids = _ids(_batches(source, total_steps=25))
    view = split_view(source.manifest, "train", None)
    for epoch in (0, 1):
        order = epoch_order(view, seed=3, epoch=epoch, index=0, parts=1, buffer_size=3).tolist()
        assert [i for batch in ids[12 * epoch : 12 * epoch + 12] for i in batch] == order[:48]
    assert ids[24] == epoch_order(view, seed=3, epoch=2, index=0, parts=1, buffer_size=3).tolist()[:4]
    assert source.position(25, 4, 1) == {"epoch": 2, "batch": 1, "sample": 4}


def test_batch_size_must_split_over_parts_and_fit_the_smallest(written):
    source = ShardSource(written.directory, image_size=4)
    with pytest.raises(ConfigError, match="^data.batch_size 5 is not divisible by the 2 data-parallel parts"):
        source.steps_per_epoch(5, 2)
    with pytest.raises(ConfigError, match=r"^data.batch_size 52: .* smallest part .* holds 24; .* <= 48$"):
        _batches(source, batch_size=52, part=(0, 2))
    with pytest.raises(DataError, match="^split 'train' has 7 shards but 8 data-parallel parts read it"):
        source.steps_per_epoch(8, 8)
    with pytest.raises(ValueError, match=r"^part: expected \(index, parts\)"):
        _batches(source, part=(2, 2))


# --- determinism: workers, resume ---------------------------------------------------------------------


def test_output_is_bit_identical_for_0_1_and_2_workers(written):
    kwargs = {"part": (0, 2), "total_steps": 14, "batch_size": 6}  # crosses an epoch boundary (spe 8)
    runs = [_batches(ShardSource(written.directory, image_size=4, workers=w), **kwargs) for w in (0, 1, 2)]
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])
    evals = [
        list(
            ShardSource(written.directory, image_size=4, workers=w).eval_batches(
                batch_size=3, part=(0, 1), device=CPU
            )
        )
        for w in (0, 2)
    ]
    assert _same(evals[0], evals[1]) and len(evals[0]) == 4


def test_resume_at_any_step_yields_the_tail_of_a_run_from_zero(written):
    source = ShardSource(written.directory, image_size=4, shuffle_buffer=5)
    full = _batches(source, total_steps=30)
    for k in (1, 11, 12, 29, 30):
        assert _same(_batches(source, start_step=k, total_steps=30), full[k:])
    resumed = _batches(
        ShardSource(written.directory, image_size=4, shuffle_buffer=5, workers=2),
        start_step=17,
        total_steps=30,
    )
    assert _same(resumed, full[17:])


def test_resume_opens_only_the_shards_its_steps_need(written, monkeypatch):
    opened: list[str] = []
    real_open = shard_index_module.open_shard

    def recording_open(path: Path):
        opened.append(path.name)
        return real_open(path)

    monkeypatch.setattr(shard_index_module, "open_shard", recording_open)
    monkeypatch.setattr(shard_index_module, "_CACHE", {})  # no index left over from other tests
    source = ShardSource(written.directory, image_size=4, shuffle_buffer=1)  # order: whole shards in turn
    _batches(source, start_step=21, total_steps=24)  # the last 3 batches (12 samples) of epoch 1
    view = split_view(source.manifest, "train", None)
    tail = epoch_order(view, seed=3, epoch=1, index=0, parts=1, buffer_size=1)[36:48]
    needed = {f"train-{i // 8:06d}.tar" for i in tail.tolist()}
    assert set(opened) == needed and len(needed) <= 3  # the 4+ shards consumed before step 21: untouched


# --- evaluation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 3, 12])
def test_eval_parts_cover_the_split_once_in_manifest_order(written, parts):
    source = ShardSource(written.directory, image_size=4, workers=2 if parts == 2 else 0)
    assert source.test_count() == 11
    everything = []
    for index in range(parts):
        batches = list(source.eval_batches(batch_size=3, part=(index, parts), device=CPU))
        ids = [i for batch in _ids(batches) for i in batch]
        assert ids == list(range(11 * index // parts, 11 * (index + 1) // parts))
        assert all(1 <= len(b.y) <= 3 for b in batches)
        everything += ids
        for batch, batch_ids in zip(batches, _ids(batches), strict=True):
            assert torch.equal(batch.y, torch.from_numpy(written.labels["test"][batch_ids]))
    assert everything == list(range(11))


def test_test_split_and_max_samples_choose_what_exists(written):
    with pytest.raises(
        ConfigError, match=re.escape("data.test_split: 'val' is not a split of ") + ".*train, test"
    ):
        ShardSource(written.directory, test_split="val")
    source = ShardSource(written.directory, image_size=4, max_samples=20)
    assert source.train_count() == 20 and source.test_count() == 11
    ids = {i for batch in _ids(_batches(source, batch_size=4, total_steps=15)) for i in batch}
    assert ids == set(range(20))  # 3 epochs of 5 steps: every sample of the first 20, none after
    small = ShardSource(written.directory, image_size=4, max_samples=6)
    assert [
        i for b in small.eval_batches(batch_size=4, part=(0, 1), device=CPU) for i in sample_ids(b.x)
    ] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DataError, match=r"^split 'train' has 3 shards \(the first data.max_samples=20\)"):
        source.steps_per_epoch(4, 4)


# --- what a batch holds -------------------------------------------------------------------------------


def test_inputs_are_normalised_on_the_device_from_uint8(tmp_path):
    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 2.0)
    data = write_shards(tmp_path / "wds", counts={"train": 8, "test": 4}, shard_size=4, mean=mean, std=std)
    source = ShardSource(data.directory, image_size=4)
    assert source.input_shape == (3, 4, 4)
    batch = next(iter(source.eval_batches(batch_size=4, part=(0, 1), device=CPU)))
    raw = torch.from_numpy(np.stack(data.inputs["test"])).permute(0, 3, 1, 2)  # stored pixels, CHW
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64 and batch.skipped == 0
    assert torch.equal(batch.x, (raw.float() / 255 - m) / s)
    assert torch.equal(batch.y, torch.from_numpy(data.labels["test"]))


def test_a_skipped_sample_is_the_mean_input_after_normalisation(tmp_path):
    data = write_shards(tmp_path / "wds", counts={"train": 8, "test": 4}, shard_size=4, mean=(0.2, 0.4, 0.6))
    shard = data.directory / "test-000000.tar"
    image = members(shard)[f"{sample_key('test', 1)}.png"]
    overwrite(shard, image.offset_data, b"\0" * image.size)
    source = ShardSource(data.directory, image_size=4, on_error="skip")
    batch = next(iter(source.eval_batches(batch_size=4, part=(0, 1), device=CPU)))
    assert batch.skipped == 1 and not batch.x[1].any() and (batch.y[1] == -1).all()
    assert batch.x[[0, 2, 3]].abs().sum(dim=(1, 2, 3)).min() > 0


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_arrays_are_read_as_stored_and_normalised(tmp_path, dtype):
    shape = (2, 3, 5)
    mean, std = (0.5, -1.0), (2.0, 4.0)
    data = write_shards(
        tmp_path / "wds",
        counts={"train": 9, "test": 5},
        shard_size=3,
        input_key="npy",
        shape=shape,
        dtype=dtype,
        mean=mean,
        std=std,
    )
    source = ShardSource(data.directory, image_size=64)  # image_size does not apply to arrays
    assert source.input_shape == shape
    batch = next(iter(source.eval_batches(batch_size=5, part=(0, 1), device=CPU)))
    raw = torch.from_numpy(np.stack(data.inputs["test"])).float()
    if dtype == "uint8":
        raw = raw / 255
    assert torch.equal(
        batch.x, (raw - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    )
    trained = _batches(source, batch_size=3, total_steps=3, seed=0)
    scale = 255.0 if dtype == "uint8" else 1.0
    unnormalised = [
        b.x * torch.tensor(std).view(1, 2, 1, 1) + torch.tensor(mean).view(1, 2, 1, 1) for b in trained
    ]
    assert sorted(i for x in unnormalised for i in sample_ids(x, scale)) == list(range(9))


def test_encoded_images_are_resized_unless_stored_at_image_size(tmp_path):
    varying = write_shards(tmp_path / "jpg", counts={"train": 4, "test": 2}, input_key="jpg", shape=None)
    batch = next(
        iter(ShardSource(varying.directory, image_size=6).eval_batches(batch_size=2, part=(0, 1), device=CPU))
    )
    assert batch.x.shape == (2, 3, 6, 6)
    gray = write_shards(tmp_path / "gray", counts={"train": 4, "test": 2}, shape=(1, 4, 4))
    source = ShardSource(gray.directory, image_size=4)
    batch = next(iter(source.eval_batches(batch_size=2, part=(0, 1), device=CPU)))
    assert source.input_shape == (1, 4, 4)
    assert torch.equal(batch.x, torch.from_numpy(np.stack(gray.inputs["test"]))[:, None].float() / 255)
    bigger = ShardSource(gray.directory, image_size=8).eval_batches(batch_size=2, part=(0, 1), device=CPU)
    assert next(iter(bigger)).x.shape == (2, 1, 8, 8)


@pytest.mark.gpu
def test_batches_on_cuda_equal_the_cpu_batches(written):
    source = ShardSource(written.directory, image_size=4, workers=2)
    cuda = _batches(source, total_steps=6, device=torch.device("cuda"))
    cpu = _batches(source, total_steps=6)
    assert all(b.x.is_cuda and b.y.is_cuda for b in cuda)
    assert all(
        torch.allclose(g.x.cpu(), c.x, atol=1e-6) and torch.equal(g.y.cpu(), c.y)
        for g, c in zip(cuda, cpu, strict=True)
    )


# --- corrupt samples ----------------------------------------------------------------------------------


def _corrupt(directory: Path) -> tuple[Path, Path]:
    """Zero the image of train sample 13 and give sample 20 an out-of-range label, sizes unchanged."""
    first = directory / "train-000001.tar"
    image = members(first)[f"{sample_key('train', 13)}.png"]
    overwrite(first, image.offset_data, b"\0" * image.size)
    second = directory / "train-000002.tar"
    labels = members(second)[f"{sample_key('train', 20)}.cls.npy"]
    raw = bytearray(second.read_bytes()[labels.offset_data : labels.offset_data + labels.size])
    raw[-8:] = np.int64(7).tobytes()  # the last task (5 classes) gets label 7
    overwrite(second, labels.offset_data, bytes(raw))
    return first, second


def test_skip_masks_exactly_the_corrupt_samples(written, copy):
    _corrupt(copy)
    intact = _batches(ShardSource(written.directory, image_size=4), total_steps=24)
    masked = _batches(ShardSource(copy, image_size=4, on_error="skip"), total_steps=24)
    hits = 0
    for good, bad in zip(intact, masked, strict=True):
        ids = sample_ids(good.x)
        rows = [r for r, i in enumerate(ids) if i in (13, 20)]
        keep = [r for r in range(len(ids)) if r not in rows]
        assert bad.skipped == len(rows)
        assert torch.equal(bad.x[keep], good.x[keep]) and torch.equal(bad.y[keep], good.y[keep])
        assert not bad.x[rows].any() and (bad.y[rows] == -1).all()
        hits += len(rows)
    assert hits == 4  # both samples, in both epochs
    workers = _batches(ShardSource(copy, image_size=4, on_error="skip", workers=2), total_steps=24)
    assert _same(workers, masked)


@pytest.mark.parametrize("workers", [0, 2])
def test_raise_names_the_shard_the_key_and_the_problem(copy, workers):
    first, second = _corrupt(copy)
    source = ShardSource(copy, image_size=4, workers=workers)
    with pytest.raises(DataError) as caught:
        _batches(source, total_steps=24)
    message = str(caught.value)
    image = f"{first}: sample 'train00013': png: not a readable image ("
    label = f"{second}: sample 'train00020': cls.npy: task 'colour' has label 7; valid: -1 (no label) to 4"
    assert message.startswith((image, label)) and "\n" not in message  # one line, even from a worker


# --- options and the registry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": -1}, "data.workers: expected an integer >= 0, got -1"),
        ({"shuffle_buffer": 0}, "data.shuffle_buffer: expected an integer >= 1, got 0"),
        ({"on_error": "ignore"}, "data.on_error: expected one of 'raise', 'skip', got 'ignore'"),
        ({"max_samples": 0}, "data.max_samples: expected an integer >= 1, got 0"),
        ({"image_size": 0}, "data.image_size: expected an integer >= 1, got 0"),
        ({"path": None}, "data.path: {name} needs the directory of shards"),
        ({"path": "/nonexistent/wds"}, "data.path: no such directory: /nonexistent/wds"),
    ],
)
def test_bad_options_are_config_errors_naming_the_field(written, options, message):
    for name in ("shards", "celeba"):
        with pytest.raises(ConfigError, match="^" + re.escape(message.format(name=name))):
            build_dataset(name, seed=0, **{"path": str(written.directory), **options})


def test_registry_builds_a_shard_source_under_both_names(written):
    expected = ("path", "image_size", "max_samples", "test_split", "workers", "shuffle_buffer", "on_error")
    for name in ("shards", "celeba"):
        assert dataset_options(name) == expected
        assert isinstance(build_dataset(name, seed=0, path=str(written.directory)), ShardSource)
        assert dataset_num_tasks(name, path=str(written.directory)) == 3
    with pytest.raises(ConfigError, match="^data.num_tasks: not an option of celeba"):
        dataset_num_tasks("celeba", path=str(written.directory), num_tasks=3)
