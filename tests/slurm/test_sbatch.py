"""The plain sbatch scripts (slurm/*.sbatch) on the test cluster: 2 CPU ranks through torchrun, the
result equal to one process's, and the pre-timeout USR1 requeueing the job, which then resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).parents[2]
SMALL = [
    "data.train_size=256",
    "data.test_size=64",
    "data.batch_size=64",
    "model.encoder=mlp",
    "model.hidden=[16]",
    "train.progress=false",
    "train.threads=1",
    "engine.timeout_s=60",
    "observe.figures=false",
    "observe.tensorboard=false",
]
STEPS = 6
# 3 processes a job (the torchrun agent and 2 ranks) on the 8 CPUs the test node declares.
JOB = ["--cpus-per-task=2", "--export=ALL,DIST_MTL_NPROC=2"]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


class SingleProcessRun:
    """`python -m dist_mtl.train` in one process (no torchrun), started in the background."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.run_dir = run_dir
        argv = [sys.executable, "-m", "dist_mtl.train", *overrides, f"run_dir={run_dir}"]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._params: dict[str, torch.Tensor] | None = None

    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            out, _ = self.proc.communicate(timeout=120)
            assert self.proc.returncode == 0, out
            self._params = _params(self.run_dir)
        return self._params


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> SingleProcessRun:
    run = SingleProcessRun(tmp_path_factory.mktemp("single") / "run", [*SMALL, f"train.steps={STEPS}"])
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.communicate()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("script", "options"),
    [("slurm/train.sbatch", []), ("slurm/train_multinode.sbatch", ["--nodes=1"])],
    ids=["train", "multinode"],
)
def test_two_cpu_ranks_equal_one_process(
    slurm_cluster: SlurmCluster,
    single_process: SingleProcessRun,
    tmp_path: Path,
    script: str,
    options: list[str],
) -> None:
    run_dir = tmp_path / "run"
    overrides = [*SMALL, f"train.steps={STEPS}", f"run_dir={run_dir}"]
    job = slurm_cluster.sbatch([f"--chdir={ROOT}", *JOB, *options], script, script_args=overrides)
    slurm_cluster.wait(job, 120, expect="COMPLETED")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2, slurm_cluster.describe(job)
    assert summary["restarts"] == 0
    expected, got = single_process.params(), _params(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.timeout(240)
def test_usr1_before_the_time_limit_requeues_the_job_which_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@120 sends) -> its trap runs `scontrol requeue`
    -> SLURM's SIGTERM stops the ranks at a step boundary with a checkpoint -> the requeued attempt
    (SLURM_RESTART_COUNT=1) resumes from it and finishes the run, all in the one appended log."""
    run_dir, steps = tmp_path / "run", 200
    overrides = [*SMALL, f"train.steps={steps}", "train.log_every=1", f"run_dir={run_dir}"]
    job = slurm_cluster.sbatch([f"--chdir={ROOT}", *JOB], "slurm/train.sbatch", script_args=overrides)
    first_step = run_dir / "metrics" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (first_step.exists() and first_step.stat().st_size > 0):
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), slurm_cluster.describe(job)
        assert time.monotonic() < deadline, slurm_cluster.describe(job)
        time.sleep(0.1)
    slurm_cluster.scancel("--batch", "--signal=USR1", job)
    slurm_cluster.wait(job, 180, expect="COMPLETED")
    assert slurm_cluster.restarts(job) == 1, slurm_cluster.describe(job)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == 2
    assert summary["restarts"] == 1 and 0 < summary["resumed_from"] < steps, slurm_cluster.describe(job)
    log = Path(slurm_cluster.job_info(job)["StdOut"]).read_text()
    assert "USR1 (time limit near): requeueing job" in log
    assert f"job {job} attempt 0" in log and f"job {job} attempt 1" in log
