"""Bad input ends as one `dist-mtl: error:` line with exit code 2, before data is built or ranks start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_mtl import cli
from dist_mtl import train as train_module
from dist_mtl.config import load_config
from dist_mtl.data import MemorySource, build_dataset
from dist_mtl.errors import ConfigError, TrainingFailed
from dist_mtl.rundir import check_run_dir

ROOT = Path(__file__).parents[2]
SMALL = [
    "data.name=synthetic",
    "data.num_tasks=4",
    "data.train_size=64",
    "data.test_size=16",
    "data.batch_size=16",
]


@pytest.fixture
def no_data_no_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build data or start torchrun fails the test: the error must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("built data or started ranks before rejecting the input")

    monkeypatch.setattr(train_module, "build_source", forbidden)
    monkeypatch.setattr(cli, "run_torchrun", forbidden)


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dist-mtl: error: "), err
    return err.strip()


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_too_many_binary_tasks_is_a_one_line_error(nproc, capsys, no_data_no_ranks, tmp_path) -> None:
    err = error_of(["data.tasks=binary", "data.num_tasks=50", f"run_dir={tmp_path}", *nproc], capsys)
    assert "data.num_tasks" in err and "50" in err


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_run_dir_under_a_file_is_rejected_before_the_data(nproc, capsys, no_data_no_ranks, tmp_path) -> None:
    (tmp_path / "file").write_text("")
    err = error_of([*SMALL, f"run_dir={tmp_path}/file/run", *nproc], capsys)
    run_dir, parent = f"{tmp_path}/file/run", f"{tmp_path}/file"
    assert err == f"dist-mtl: error: run_dir {run_dir} cannot be created: {parent} is not a directory"
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_run_dir_is_rejected_before_the_data(capsys, no_data_no_ranks, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        err = error_of([*SMALL, f"run_dir={locked}/run"], capsys)
    finally:
        locked.chmod(0o755)
    assert f"run_dir {locked}/run is not writable" in err


def test_run_dir_probe_creates_nothing(tmp_path) -> None:
    check_run_dir(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_cuda_without_a_gpu_is_rejected_before_the_data(nproc, capsys, no_data_no_ranks, tmp_path) -> None:
    err = error_of([*SMALL, "train.device=cuda", f"run_dir={tmp_path}", *nproc], capsys)
    assert "train.device is 'cuda' but no CUDA device is available" in err


def test_impossible_layout_is_rejected_in_the_parent(capsys, no_data_no_ranks, tmp_path) -> None:
    err = error_of([*SMALL, "engine.task_parallel=3", f"run_dir={tmp_path}", "--nproc", "2"], capsys)
    assert err == "dist-mtl: error: engine.task_parallel K=3 does not divide the world size W=2"
    assert list(tmp_path.iterdir()) == []


def test_batch_larger_than_the_split_is_rejected_at_load(capsys, no_data_no_ranks, tmp_path) -> None:
    err = error_of(
        ["data.train_size=100", "data.batch_size=128", f"run_dir={tmp_path}", "--nproc", "2"], capsys
    )
    assert "data.batch_size 128 is larger than the training split of 'multidigits' (100 samples" in err


def test_batch_larger_than_a_built_split_is_rejected_before_training(monkeypatch, tmp_path) -> None:
    """Data sets whose size the config does not fix (celeba) are checked right after they are built."""
    cfg = load_config(None, [*SMALL, f"run_dir={tmp_path}"])
    small = build_dataset("synthetic", seed=0, num_tasks=4, train_size=10, test_size=4)
    monkeypatch.setattr(train_module, "build_source", lambda cfg: MemorySource(*small))
    with pytest.raises(
        ConfigError,
        match=r"data.batch_size 16 is larger than the training split of "
        r"'synthetic' \(10 samples, as built\); use data.batch_size <= 10",
    ):
        train_module.build_checked_source(cfg)


def test_non_finite_values_are_one_line_errors(capsys, no_data_no_ranks) -> None:
    assert error_of(["optim.lr=inf"], capsys) == "dist-mtl: error: optim.lr must be a finite number; got inf"


def test_mgda_ub_config_passes_the_parent_checks_for_two_ranks(monkeypatch, tmp_path) -> None:
    """protocol auto makes the rep-mode config valid for several ranks without engine.protocol=rep."""
    started: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(cli, "run_torchrun", lambda n, args, **kw: started.append((n, list(args))) or 0)
    config = str(ROOT / "configs" / "multidigits_mgda_ub.yaml")
    assert cli.main(["train", config, "--nproc", "2", f"run_dir={tmp_path}"]) == 0
    assert started == [(2, [config, f"run_dir={tmp_path}"])]


def test_a_failed_run_is_one_line_with_exit_code_1(monkeypatch, capsys, tmp_path) -> None:
    """TrainingFailed (e.g. most steps skipped) is not bad input (2) and not a bug (a traceback)."""

    def failing(*args, **kwargs):
        raise TrainingFailed("12 of 12 steps were skipped")

    monkeypatch.setattr(cli, "run", failing)
    assert cli.main(["train", f"run_dir={tmp_path}"]) == 1
    assert capsys.readouterr().err == "dist-mtl: error: 12 of 12 steps were skipped\n"
    monkeypatch.setattr(train_module, "run", failing)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_module.main([f"run_dir={tmp_path}"]) == 1
    assert capsys.readouterr().err == "dist_mtl.train: rank 1: error: 12 of 12 steps were skipped\n"


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_a_run_dir_holding_a_run_is_rejected_before_the_data(
    nproc, capsys, no_data_no_ranks, tmp_path
) -> None:
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    err = error_of([*SMALL, f"run_dir={tmp_path}", *nproc], capsys)
    assert f"run_dir {tmp_path} already holds a run" in err and "--overwrite" in err


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_resume_with_overwrite_is_rejected_before_the_data(nproc, capsys, no_data_no_ranks, tmp_path) -> None:
    err = error_of([*SMALL, f"run_dir={tmp_path}", "--resume", "--overwrite", *nproc], capsys)
    assert "--resume and --overwrite contradict each other" in err
