"""Streamed shard directories end to end: exact mid-epoch resume, 2-rank runs through the CLI on a
converted CelebA miniature and on bring-your-own arrays with missing labels, and corrupt samples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_mtl.checkpoint import load_checkpoint
from dist_mtl.cli import main
from dist_mtl.config import load_config
from dist_mtl.data import Batch, make_celeba_miniature
from dist_mtl.data.celeba_like import make_celeba_like_shards
from dist_mtl.data.stream import ShardSource
from dist_mtl.trainer import train

# 64 train images in 8 shards of 8 (16 x 16): 6 steps an epoch at batch 10, so step 9 is mid-epoch 2.
STREAM = [
    "data.name=shards",
    "data.image_size=16",
    "data.batch_size=10",
    "data.shuffle_buffer=12",
    "model.encoder=mlp",
    "model.hidden=[16]",
    "model.rep_dim=8",
    "balancer.name=mgda",
    "optim.name=adam",
    "train.progress=false",
    "train.log_every=1",
    "observe.tensorboard=false",
]


@pytest.fixture(scope="module")
def celeba_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("celeba_like") / "shards"
    return make_celeba_like_shards(out, 80, seed=3, image_size=16, shard_size=8).parent


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_mid_epoch_resume_with_two_workers_is_bit_identical(tmp_path: Path, celeba_like: Path) -> None:
    """Interrupted at step 9 (mid-epoch 2) and resumed with 2 workers = uninterrupted with 0 workers."""
    common = [*STREAM, f"data.path={celeba_like}"]
    whole = load_config(None, [*common, f"run_dir={tmp_path / 'whole'}", "train.steps=15", "data.workers=0"])
    train(whole)
    parts = [*common, f"run_dir={tmp_path / 'parts'}", "data.workers=2"]
    train(load_config(None, [*parts, "train.steps=9"]))
    first = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert json.loads(first["data_position"]) == {"epoch": 1, "batch": 3, "sample": 30}
    train(load_config(None, [*parts, "train.steps=15"]), resume=True)
    expected, got = _params(tmp_path / "whole"), _params(tmp_path / "parts")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    summary = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert summary["data"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["data"]
    assert sum(summary["data"]["labelled_seen"].values()) == 15 * 10 * 40  # CelebA: every label present
    # Resuming the finished run only re-reads its result (the stream has no step left to serve).
    again = train(load_config(None, [*parts, "train.steps=15"]), resume=True)
    assert again["tasks"] == summary["tasks"] and again["resumed_from"] == 15


def test_celeba_miniature_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Convert with the CLI, train 1 x 2 exact MGDA with a loader worker per rank: one data part, so
    the ranks read what one process reads and the result equals the single-process run."""
    root = make_celeba_miniature(tmp_path / "celeba", num_images=60, seed=5)
    shards = tmp_path / "shards"
    assert main(["data", "celeba", str(root), str(shards), "--image-size", "16", "--shard-size", "8"]) == 0
    # SGD: Adam's g / sqrt(v) would magnify last-bit differences of near-zero gradients.
    common = [*STREAM, f"data.path={shards}", "data.workers=1", "train.steps=6", "train.threads=1"]
    common += ["optim.name=sgd", "optim.lr=0.05"]
    two = tmp_path / "two"
    argv = ["train", "--nproc", "2", *common, f"run_dir={two}", "engine.protocol=gramian"]
    assert main(argv) == 0
    assert main(["train", *common, f"run_dir={tmp_path / 'one'}"]) == 0
    expected, got = _params(tmp_path / "one"), _params(two)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["tasks"]) == 40
    smiling = summary["tasks"]["Smiling"]
    assert {"loss", "accuracy", "error", "f1", "labelled"} <= set(smiling)
    assert summary["metrics"]["average_error"] == pytest.approx(
        np.mean([m["error"] for m in summary["tasks"].values()])
    )


class UnionOfParts:
    """One process reading what D replicas read: step s's batch is the concatenation of the D parts'
    batches of step s, i.e. the global batch of a D-replica run (the engine's contract reference)."""

    def __init__(self, source: ShardSource, parts: int) -> None:
        self.source, self.parts = source, parts
        self.tasks, self.input_shape = source.tasks, source.input_shape

    def train_count(self) -> int:
        return self.source.train_count()

    def steps_per_epoch(self, batch_size: int, parts: int) -> int:
        return self.source.steps_per_epoch(batch_size, self.parts)

    def position(self, step: int, batch_size: int, parts: int) -> dict[str, int]:
        return self.source.position(step, batch_size, self.parts)

    def train_batches(self, *, part: tuple[int, int], **kwargs) -> Iterator[Batch]:
        streams = [self.source.train_batches(part=(r, self.parts), **kwargs) for r in range(self.parts)]
        for batches in zip(*streams, strict=True):
            yield Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]))

    def eval_batches(self, **kwargs) -> Iterator[Batch]:
        return self.source.eval_batches(**kwargs)


def test_two_replicas_equal_one_process_reading_both_parts(tmp_path: Path, celeba_like: Path) -> None:
    """2 x 1 exact MGDA through the CLI (each replica streams its own shards) equals one process
    trained on the union of the two parts' batches: the engine's contract on streamed data."""
    common = [*STREAM, f"data.path={celeba_like}", "train.steps=8", "train.threads=1"]
    common += ["optim.name=sgd", "optim.lr=0.05"]
    two = tmp_path / "two"
    argv = ["train", "--nproc", "2", *common, f"run_dir={two}", "engine.replicas=2", "data.workers=1"]
    assert main(argv) == 0
    cfg = load_config(None, [*common, f"run_dir={tmp_path / 'one'}"])
    train(cfg, datasets=UnionOfParts(ShardSource(celeba_like, image_size=16, shuffle_buffer=12), 2))
    expected, got = _params(tmp_path / "one"), _params(two)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def _byo_arrays(directory: Path, rows: int = 120) -> tuple[Path, Path]:
    """Float32 (N, 1, 6, 6) inputs and 3 tasks (binary, 3-way, binary) with 30 % of labels missing."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 1, 6, 6)).astype(np.float32)
    score = x.reshape(rows, -1)[:, :3]
    labels = {
        "positive": (score[:, 0] > 0).astype(np.int64),
        "band": np.digitize(score[:, 1], [-0.5, 0.5]).astype(np.int64),
        "larger": (score[:, 2] > score[:, 0]).astype(np.int64),
    }
    for name in labels:
        labels[name][rng.random(rows) < 0.3] = -1
    directory.mkdir()
    np.save(directory / "x.npy", x)
    np.savez(directory / "y.npz", **labels)
    return directory / "x.npy", directory / "y.npz"


def test_byo_arrays_with_missing_labels_train_on_two_ranks(tmp_path: Path) -> None:
    """`dist-mtl data arrays` then a 2 x 1 rep run (two data parts) through the CLI."""
    inputs, labels = _byo_arrays(tmp_path / "arrays")
    out = tmp_path / "byo"
    argv = ["data", "arrays", "--inputs", str(inputs), "--labels", str(labels), "--out", str(out)]
    assert main([*argv, "--test-fraction", "0.25", "--shard-size", "15"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["classes"] for t in manifest["tasks"]] == [2, 3, 2]
    run_dir = tmp_path / "run"
    overrides = [
        "data.name=shards",
        f"data.path={out}",
        "data.batch_size=10",
        "model.encoder=mlp",
        "model.hidden=[16]",
        "train.mode=rep",
        "train.steps=6",
        "train.progress=false",
        "train.log_every=1",
        "train.threads=1",
        "observe.tensorboard=false",
        f"run_dir={run_dir}",
    ]
    assert main(["train", "--nproc", "2", *overrides]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["tasks"]) == {"positive", "band", "larger"}
    labelled = summary["data"]["labelled_seen"]
    assert 0 < labelled["band"] < 6 * 10  # some of the 60 samples seen had no label for "band"
    test_labelled = {t: m["labelled"] for t, m in summary["tasks"].items()}
    assert test_labelled == dict(
        zip([t["name"] for t in manifest["tasks"]], manifest["splits"]["test"]["labelled"], strict=True)
    )
    for rank in (0, 1):
        record = json.loads((run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()[0])
        assert {"labelled/positive", "labelled/band", "labelled/larger"} <= set(record)


def _corrupt_one_jpeg(shards: Path) -> str:
    """Overwrite the middle of the first train sample's JPEG in place (sizes unchanged); its key."""
    import tarfile

    shard = shards / "train-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    raw = bytearray(shard.read_bytes())
    start = member.offset_data + 2  # keep the SOI marker: a JPEG that breaks while decoding
    raw[start : start + member.size - 4] = b"\x00" * (member.size - 4)
    shard.write_bytes(bytes(raw))
    return member.name.split(".")[0]


def test_a_corrupt_sample_fails_naming_it_or_is_skipped_and_counted(tmp_path: Path, capsys) -> None:
    shards = make_celeba_like_shards(tmp_path / "shards", 40, seed=1, image_size=16, shard_size=8).parent
    key = _corrupt_one_jpeg(shards)
    common = [*STREAM, f"data.path={shards}", "train.steps=8", "data.batch_size=8"]
    assert main(["train", *common, f"run_dir={tmp_path / 'raise'}"]) == 2
    err = capsys.readouterr().err
    assert "train-000000.tar" in err and key in err and err.count("\n") == 1
    assert main(["train", *common, f"run_dir={tmp_path / 'skip'}", "data.on_error=skip"]) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    # 32 train samples, 4 steps an epoch of 8: 8 steps read every sample twice
    assert summary["data"]["skipped_samples"] == 2
    assert summary["skipped_steps"] == 0
