"""End to end: `dist-mtl train --nproc 2` (torchrun underneath): a run and `dist-mtl profile` on it,
the rep-mode config through protocol auto, a failing rank's line printed last, and SIGTERM stopping
torchrun and every rank without leaving torchelastic_* directories behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_mtl.engine.fault import FAULT_ENV
from tests.distributed.harness import BASE, ROOT, rank_env

pytestmark = [pytest.mark.distributed]

DIST_MTL = [sys.executable, "-m", "dist_mtl.cli"]


def cli_env(tmpdir: Path | None = None, **extra: str) -> dict[str, str]:
    """The test environment without a rank's variables (torchrun sets them), with its own TMPDIR."""
    env = {
        k: v
        for k, v in rank_env(0, 1, 0).items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    }
    if tmpdir is not None:
        tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return {**env, **extra}


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (the test's own reading, independent of dist_mtl.cli)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        kids = [pid for pid, ppid in parent.items() if ppid == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


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


@pytest.mark.timeout(300)
def test_mgda_ub_config_runs_on_two_ranks_with_options_in_any_order(tmp_path: Path) -> None:
    """configs/multidigits_mgda_ub.yaml sets train.mode rep and no protocol: auto picks rep."""
    run_dir = tmp_path / "run"
    train = [
        *DIST_MTL,
        "train",
        "configs/multidigits_mgda_ub.yaml",
        "--nproc",
        "2",
        "data.train_size=256",
        "data.test_size=64",
        "data.batch_size=64",
        "train.steps=2",
        "train.progress=false",
        "observe.tensorboard=false",
        f"run_dir={run_dir}",
        "--overwrite",
    ]
    done = subprocess.run(train, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layout D x K = 2 x 1, protocol rep" in done.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.timeout(300)
def test_a_failing_rank_s_error_line_is_printed_last(tmp_path: Path) -> None:
    """Rank 1 dies at step 2; rank 0's collective error (rank, collective, step) ends the output."""
    train = [
        *DIST_MTL,
        "train",
        "--nproc",
        "2",
        *BASE,
        "train.steps=8",
        "engine.protocol=gramian",
        f"run_dir={tmp_path / 'run'}",
    ]
    env = cli_env(tmp_path / "tmp", **{FAULT_ENV: "exit:1:2"})
    done = subprocess.run(train, env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist_mtl.train: rank 0: error: ") and "step 2" in last, done.stderr
    assert not list((tmp_path / "tmp").glob("torchelastic_*"))


@pytest.mark.timeout(300)
def test_sigterm_stops_torchrun_and_every_rank(tmp_path: Path) -> None:
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    train = [
        *DIST_MTL,
        "train",
        "--nproc",
        "2",
        *BASE,
        "train.steps=100000",
        "engine.checksum_every=0",
        f"run_dir={run_dir}",
    ]
    log = (tmp_path / "output.txt").open("w")
    proc = subprocess.Popen(train, env=cli_env(tmpdir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        metrics = run_dir / "metrics" / "rank0.jsonl"
        deadline = time.monotonic() + 200
        while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is done
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()
            time.sleep(0.2)
        seen = set(descendants(proc.pid))
        assert len(seen) >= 3, seen  # torchrun and two ranks
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=60)
        while any(alive(pid) for pid in seen) and time.monotonic() - signalled < 40:
            time.sleep(0.2)
        assert not [pid for pid in seen if alive(pid)], (tmp_path / "output.txt").read_text()
        assert proc.returncode == 128 + signal.SIGTERM
        assert not list(tmpdir.glob("torchelastic_*"))
    finally:
        for pid in seen | set(descendants(proc.pid)):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        log.close()
