"""Inside a SLURM job (SLURM_JOB_ID set) SIGTERM stops a run at a step boundary with a checkpoint,
every rank after the same step, and the next attempt (SLURM_RESTART_COUNT=1, the same arguments)
resumes it to the parameters of an uninterrupted run, bit for bit. The real SLURM versions of
these runs (requeue, pre-timeout signal) are in tests/slurm."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import load_checkpoint
from dist_mtl.stop import STOPPED_EXIT
from tests.distributed.test_engine_cli import cli_env, descendants

ROOT = Path(__file__).parents[2]
RUN = [
    "data.train_size=512",
    "data.test_size=64",
    "data.batch_size=32",
    "model.encoder=mlp",
    "model.hidden=[16]",
    "train.progress=false",
    "train.log_every=1",
    "train.threads=1",
    "train.steps=600",
    "observe.figures=false",
    "observe.tensorboard=false",
    "engine.checksum_every=0",
    "engine.timeout_s=60",
]
_STOPPED = re.compile(r"stopped by (\S+(?: peer rank)?) after step (\d+)")


def command(nproc: int, run_dir: Path) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dist_mtl.train", *RUN, f"run_dir={run_dir}"]
    return [sys.executable, "-m", "dist_mtl.cli", "train", "--nproc", str(nproc), *RUN, f"run_dir={run_dir}"]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def stop_after_some_steps(nproc: int, run_dir: Path, tmp: Path) -> tuple[int, str]:
    """Start the run as attempt 1 of SLURM job 4242, SIGTERM one rank after 20 logged steps."""
    env = cli_env(tmp / "tmp", SLURM_JOB_ID="4242")
    proc = subprocess.Popen(command(nproc, run_dir), env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = run_dir / "metrics" / "rank0.jsonl", time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 20):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.05)
        # One rank only (the last one started): the others learn it from the stop vote.
        target = proc.pid if nproc == 1 else max(descendants(proc.pid))
        os.kill(target, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_in_a_slurm_job_stops_at_an_agreed_step_and_the_next_attempt_resumes_exactly(
    tmp_path: Path, nproc: int
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = subprocess.run(command(nproc, whole), env=cli_env(tmp_path / "tmp"), cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr

    code, stderr = stop_after_some_steps(nproc, parts, tmp_path)
    stops = _STOPPED.findall(stderr)
    assert len(stops) == nproc, stderr  # each rank says why it stopped ...
    steps = {int(step) for _, step in stops}
    assert len(steps) == 1, stderr  # ... and they all stopped after the same step
    (step,) = steps
    assert 20 <= step < 600
    assert "SIGTERM" in {who for who, _ in stops}
    if nproc == 1:
        assert code == STOPPED_EXIT
    else:
        assert code != 0  # torchrun reports its ranks' exit code 75 as a failure
    saved = sorted(p.name for p in (parts / "checkpoints").iterdir())
    assert saved == ["last.pt", f"step_{step:08d}.pt"], saved  # the stop wrote exactly one checkpoint

    # The requeued attempt: the same command, SLURM_RESTART_COUNT=1, no --resume given.
    env = cli_env(tmp_path / "tmp", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    again = subprocess.run(command(nproc, parts), env=env, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["resumed_from"] == step and summary["restarts"] == 1
    expected, got = params(whole), params(parts)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_outside_slurm_sigterm_keeps_its_default_meaning(tmp_path: Path) -> None:
    """No SLURM_JOB_ID: no handler is installed, SIGTERM ends the process at once (no checkpoint)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(1, run_dir), env=cli_env(tmp_path / "tmp"), cwd=ROOT)
    try:
        metrics, deadline = run_dir / "metrics" / "rank0.jsonl", time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 5):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()
    assert not (run_dir / "checkpoints").exists()
