"""What the single-process integration tests share: a small run's config and a data set with a NaN."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_mtl import trainer as trainer_module
from dist_mtl.config import RunConfig, load_config
from dist_mtl.data import MemorySource, MultiTaskDataset

SMALL = [
    "data.train_size=512",
    "data.test_size=128",
    "data.batch_size=64",
    "model.encoder=mlp",
    "model.hidden=[32]",
    "model.rep_dim=16",
    "train.progress=false",
    "train.log_every=1",
    "observe.figures=false",  # the TensorBoard figures have their own test
]


def small_config(run_dir: Path, *extra: str) -> RunConfig:
    """MultiDigits pair, an MLP, batch 64 of 512 samples (8 steps an epoch), logging every step."""
    return load_config(None, [f"run_dir={run_dir}", *SMALL, *extra])


def put_nan_in_sample_five(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training sample 5 becomes NaN: the batch holding it (one per epoch) has a non-finite Gramian."""
    real = trainer_module.build_source

    def with_a_nan_sample(cfg: RunConfig) -> MemorySource:
        source = real(cfg)
        train_set = source.train
        x = train_set.x.clone()
        x[5] = float("nan")
        return MemorySource(MultiTaskDataset(x=x, y=train_set.y, tasks=train_set.tasks), source.test)

    monkeypatch.setattr(trainer_module, "build_source", with_a_nan_sample)
