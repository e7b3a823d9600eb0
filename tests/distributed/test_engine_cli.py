"""End to end: `dist-mtl train --nproc 2` (torchrun underneath), then `dist-mtl profile` on the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import BASE, ROOT, rank_env

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(240)
def test_train_nproc_two_writes_per_rank_metrics_and_profile_reports_traffic(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in rank_env(0, 1, 0).items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    }
    train = [
        sys.executable,
        "-m",
        "dist_mtl.cli",
        "train",
        "--nproc",
        "2",
        *BASE,
        "train.steps=6",
        "observe.tensorboard=true",
        "observe.profiler_start=3",
        "observe.profiler_steps=2",
        "engine.protocol=gramian",
        f"run_dir={run_dir}",
    ]
    done = subprocess.run(train, env=env, cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layout D x K = 1 x 2, protocol gramian" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert (run_dir / "metrics" / "rank0.jsonl").is_file() and (run_dir / "metrics" / "rank1.jsonl").is_file()
    assert any((run_dir / "tb").iterdir()) and all(
        (run_dir / "profile" / f"rank{r}" / "trace.json").is_file() for r in (0, 1)
    )
    profile = subprocess.run(
        [sys.executable, "-m", "dist_mtl.cli", "profile", str(run_dir)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert profile.returncode == 0, profile.stderr
    exchange = [line for line in profile.stdout.splitlines() if line.startswith("exchange")]
    assert len(exchange) == 2 and all("KiB" in line for line in exchange), profile.stdout
