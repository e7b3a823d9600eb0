"""The submitit launcher runs a real job through submitit's local executor (no SLURM needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.timeout(300)
def test_submitit_local_executor_runs_two_ranks(tmp_path: Path) -> None:
    """Two submitit tasks become two torch.distributed ranks (the SLURM path, without SLURM)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "submit.py"),
        "--executor",
        "local",
        "--folder",
        str(tmp_path / "submitit" / "%j"),
        "--timeout-min",
        "5",
        "--tasks-per-node",
        "2",
        f"run_dir={run_dir}",
        "data.train_size=256",
        "data.test_size=64",
        "data.batch_size=64",
        "model.encoder=mlp",
        "model.hidden=[16]",
        "train.steps=3",
        "train.progress=false",
        "engine.timeout_s=60",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2


def test_bad_config_fails_before_submission(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "submit.py"),
        "--executor",
        "local",
        "--folder",
        str(tmp_path / "%j"),
        "balancer.name=nope",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "balancer.name must be one of" in done.stderr
    assert not any(tmp_path.iterdir())
