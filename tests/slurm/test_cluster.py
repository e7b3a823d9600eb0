"""The test cluster itself: a 2-task job step runs, and a requeued job runs again with Restarts=1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(120)
def test_a_two_task_step_runs_on_the_node(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.sbatch(["--ntasks=2", "--job-name=hostname"], wrap="srun hostname")
    slurm_cluster.wait(job, 60, expect="COMPLETED")
    info = slurm_cluster.job_info(job)
    assert info["NumTasks"] == "2" and info["Partition"] == slurm_cluster.partition
    lines = Path(info["StdOut"]).read_text().split()
    assert lines == [slurm_cluster.node] * 2, slurm_cluster.describe(job)
    assert slurm_cluster.restarts(job) == 0


@pytest.mark.timeout(120)
def test_a_requeued_job_runs_again_with_its_restart_count(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Each start appends SLURM_RESTART_COUNT; the first one sleeps until `scontrol requeue`."""
    starts = tmp_path / "starts"
    script = tmp_path / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n"
        f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {starts}\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then sleep 300; fi\n'
    )
    job = slurm_cluster.sbatch(["--job-name=requeue", "--requeue"], script)
    slurm_cluster.wait_for(job, ["RUNNING"], 30)
    deadline = time.monotonic() + 30
    while not (starts.exists() and starts.read_text()):
        assert time.monotonic() < deadline, slurm_cluster.describe(job)
        time.sleep(0.1)
    slurm_cluster.scontrol("requeue", job)
    slurm_cluster.wait(job, 60, expect="COMPLETED")
    assert starts.read_text().split() == ["0", "1"], slurm_cluster.describe(job)
    assert slurm_cluster.restarts(job) == 1
