"""`dist-mtl launch` on the real single-node SLURM (no accounting storage, so submitit alone would
see every job as UNKNOWN): a 2-rank job returns its summary; a job requeued mid-run with `scontrol
requeue`, and one sent its pre-timeout signal (USR2, as `--signal=USR2@S` sends it), checkpoint at
an agreed step, are requeued, resume, and end with the parameters of an uninterrupted run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import load_checkpoint
from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).parents[2]
LAUNCH = [sys.executable, "-m", "dist_mtl.cli", "launch"]
SMALL = [
    "data.train_size=512",
    "data.test_size=64",
    "data.batch_size=32",
    "model.encoder=mlp",
    "model.hidden=[16]",
    "train.progress=false",
    "train.log_every=1",
    "train.threads=1",
    "observe.figures=false",
    "observe.tensorboard=false",
    "engine.checksum_every=0",
    "engine.timeout_s=60",
]
LONG = [*SMALL, "train.steps=500"]  # long enough to be stopped mid-run on this machine


def launch_args(cluster: SlurmCluster, run_dir: Path, *extra: str) -> list[str]:
    options = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
    options += ["--partition", cluster.partition]
    return [*LAUNCH, *options, f"run_dir={run_dir}", *extra]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same 2-rank run, uninterrupted, under torchrun on this machine."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dist_mtl.cli", "train", "--nproc", "2", *LONG, f"run_dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.timeout(240)
def test_a_two_rank_job_trains_and_returns_its_summary(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = launch_args(slurm_cluster, run_dir, *SMALL, "train.steps=6")
    done = subprocess.run(args, cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    assert "steps 6  wall" in done.stdout and f"run directory: {run_dir}" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    logs = run_dir / "submitit"
    assert (logs / f"{job}_0_log.err").is_file() and (logs / f"{job}_1_log.err").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    # What was submitted is what --dry-run prints (whose text tests/unit/test_launch_options.py pins).
    dry = subprocess.run([*args, "--dry-run", "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert (logs / f"{job}_submission.sh").read_text() == dry.stdout


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, count: int, timeout_s: float = 120) -> None:
    metrics, deadline = run_dir / "metrics" / "rank0.jsonl", time.monotonic() + timeout_s
    while not (metrics.is_file() and metrics.read_text().count("\n") >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {count} steps after {timeout_s} s"
        time.sleep(0.1)


@pytest.fixture
def launched(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """A waiting `dist-mtl launch` of the long run, its job id, and the run directory."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*launch_args(slurm_cluster, run_dir, *LONG), "train.checkpoint_every=0"],
        cwd=ROOT,
        env=slurm_cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        job = re.search(r"submitted job (\d+)", first)
        assert job, first + proc.communicate()[1]
        yield proc, job.group(1), run_dir
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["scontrol requeue", "pre-timeout signal"])
def test_a_stopped_job_is_requeued_and_ends_with_the_uninterrupted_parameters(
    slurm_cluster: SlurmCluster, launched: tuple[subprocess.Popen, str, Path], uninterrupted: Path, how: str
) -> None:
    proc, job, run_dir = launched
    wait_for_steps(run_dir, proc, 20)
    if how == "scontrol requeue":  # SLURM sends SIGTERM and requeues the job itself
        slurm_cluster.scontrol("requeue", job)
    else:  # what --signal=USR2@S sends S seconds before the limit: the job requeues itself
        slurm_cluster.scancel("--signal=USR2", job)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err + slurm_cluster.describe(job)
    assert "steps 500  wall" in out
    assert slurm_cluster.restarts(job) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["resumed_from"]
    assert summary["restarts"] == 1 and 20 <= stopped < 500, summary
    # train.checkpoint_every=0: the only checkpoint before the end is the one the stop wrote.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == [
        f"step_{stopped:08d}.pt",
        "step_00000500.pt",
    ]
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob(f"{job}_*_log.err"))
    assert len(re.findall(rf"stopped by \S+(?: peer rank)? after step {stopped}\b", logs)) == 2, logs
    expected, got = params(uninterrupted), params(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.timeout(240)
def test_a_cancelled_job_is_reported_not_waited_for_forever(
    slurm_cluster: SlurmCluster, launched: tuple[subprocess.Popen, str, Path]
) -> None:
    """No accounting: submitit would see UNKNOWN forever; the launcher reads scontrol and ends."""
    proc, job, run_dir = launched
    wait_for_steps(run_dir, proc, 5)
    slurm_cluster.scancel(job)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dist-mtl: error: job {job} ended CANCELLED") and "without a result" in last, err


@pytest.mark.timeout(240)
def test_a_failed_job_prints_the_failing_rank_s_error(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    args = launch_args(slurm_cluster, tmp_path / "run", *SMALL, "train.steps=8", "engine.protocol=gramian")
    env = {**slurm_cluster.env, "DIST_MTL_FAULT": "exit:1:2"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode != 0, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist_mtl.train: rank 0: error: ") and "step 2" in last, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_a_submission_slurm_refuses_surfaces_slurm_s_message(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    args = [*launch_args(slurm_cluster, tmp_path / "run", *SMALL, "train.steps=4"), "--partition", "nosuch"]
    done = subprocess.run(args, cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-mtl: error: SLURM refused the job: invalid partition specified: nosuch"), (
        last
    )
    assert "Traceback" not in done.stderr and "submitted job" not in done.stdout


@pytest.mark.timeout(120)
def test_a_job_that_can_never_start_is_cancelled_and_named(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """2 tasks of 16 CPUs on a node of 8: SLURM (without EnforcePartLimits) accepts the job and keeps it
    PENDING (Reason=PartitionConfig) forever; the launcher says so and cancels it instead of waiting."""
    args = [*launch_args(slurm_cluster, tmp_path / "run", *SMALL, "train.steps=4"), "--cpus-per-task", "16"]
    done = subprocess.run(args, cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2, done.stdout + done.stderr
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dist-mtl: error: job {job} can never start: "), last
    assert "Reason=PartitionConfig" in last and "--cpus-per-task" in last, last
    assert slurm_cluster.wait(job, 30) == "CANCELLED"
