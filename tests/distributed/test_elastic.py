"""`dist-mtl train --nproc 2 --max-restarts R` through the real CLI and torchrun: a rank that dies
(DIST_MTL_FAULT=exit, which fires in the first attempt only) makes torchrun restart every rank; the
restarted attempt resumes from the last checkpoint (or, with none written yet, starts the run again)
and ends with parameters equal, bit for bit, to an uninterrupted run's. With --max-restarts 0 the
same fault fails the run, the surviving rank's error line printed last."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_mtl.engine.fault import FAULT_ENV
from tests.distributed.harness import BASE, ROOT, rank_env

pytestmark = [pytest.mark.distributed]

DIST_MTL = [sys.executable, "-m", "dist_mtl.cli"]
# 8 steps of the 1 x 2 exact layout, a checkpoint every 2; a surviving rank stuck in a collective
# gives up within 30 s (torchrun stops it sooner: it restarts the whole group once it sees a rank die).
RUN = [*BASE, "engine.protocol=gramian", "engine.timeout_s=30", "train.steps=8", "train.checkpoint_every=2"]
# torchrun names the first failure it records: the faulted rank 1 (exit code 17), or rank 0 when its
# collective with the dead peer fails first (with engine.overlap its all-to-all is in flight during the
# backward, so either can win the race)
RESTART_NOTICE = re.compile(
    r"dist-mtl: local rank (1 failed \(exit code 17\)|0 failed \(exit code 1\)); "
    r"torchrun restarts every rank \(restart 1 of 1\)"
)


def cli_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    """The test environment without a rank's variables (torchrun sets them), with its own TMPDIR."""
    env = rank_env(0, 1, 0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", FAULT_ENV):
        env.pop(name, None)
    tmpdir.mkdir(exist_ok=True)
    return {**env, "TMPDIR": str(tmpdir), **extra}


def train(run_dir: Path, *options: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*DIST_MTL, "train", "--nproc", "2", *options, *RUN, f"run_dir={run_dir}"]
    env = cli_env(run_dir.parent / "tmp", **({FAULT_ENV: fault} if fault else {}))
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, different


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = train(run_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    return final_model(run_dir)


@pytest.mark.timeout(200)
def test_a_dead_rank_restarts_the_group_which_resumes_from_the_last_checkpoint(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Rank 1 dies at step 5; the restarted attempt resumes from step 4's checkpoint, replays step 5
    without dying again, and ends where the uninterrupted run does, bit for bit."""
    run_dir = tmp_path / "run"
    done = train(run_dir, "--max-restarts", "1", fault="exit:1:5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(f"rank 1: {FAULT_ENV}: exiting at step 5") == 1, done.stdout  # fired once
    assert RESTART_NOTICE.search(done.stderr), done.stderr
    assert "steps 8  wall" in done.stdout and f"run directory: {run_dir}" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from"], summary["restarts"]) == (8, 4, 1)
    assert_bit_identical(final_model(run_dir), uninterrupted)
    assert not list((tmp_path / "tmp").glob("torchelastic_*"))


@pytest.mark.timeout(200)
def test_a_fault_before_any_checkpoint_restarts_the_run_from_scratch(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Rank 1 dies at step 1, before the first checkpoint: the restarted attempt replaces the partial
    run (the first attempt's config and metrics) and trains all 8 steps again."""
    run_dir = tmp_path / "run"
    done = train(run_dir, "--max-restarts", "1", fault="exit:1:1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(f"rank 1: {FAULT_ENV}: exiting at step 1") == 1, done.stdout  # fired once
    assert RESTART_NOTICE.search(done.stderr), done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from"], summary["restarts"]) == (8, 0, 0)
    assert_bit_identical(final_model(run_dir), uninterrupted)


@pytest.mark.timeout(200)
def test_without_restarts_the_same_fault_fails_the_run_with_the_rank_s_line_last(tmp_path: Path) -> None:
    done = train(tmp_path / "run", "--max-restarts", "0", fault="exit:1:5")
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist_mtl.train: rank 0: error: ") and "step 5" in last, done.stderr
    assert "torchrun restarts" not in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
