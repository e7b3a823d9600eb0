"""The submitit launcher runs a real job through submitit's local executor (no SLURM needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_mtl.engine.fault import FAULT_ENV

ROOT = Path(__file__).parents[2]
SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]
SMALL = [
    "data.train_size=256",
    "data.test_size=64",
    "data.batch_size=64",
    "model.encoder=mlp",
    "model.hidden=[16]",
    "train.progress=false",
    "engine.timeout_s=60",
]


def submit(*args: str, timeout: int = 280, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SUBMIT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(300)
def test_submitit_local_executor_runs_two_ranks(tmp_path: Path) -> None:
    """Two submitit tasks become two torch.distributed ranks (the SLURM path, without SLURM); the
    command waits, prints the summary, and logs go to RUN_DIR/submitit without a literal %j folder."""
    run_dir = tmp_path / "run"
    done = submit(
        "--executor",
        "local",
        "--time",
        "5",
        "--tasks-per-node",
        "2",
        f"run_dir={run_dir}",
        *SMALL,
        "train.steps=3",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2
    assert "steps 3  wall" in done.stdout
    assert f"run directory: {run_dir}" in done.stdout
    assert any((run_dir / "submitit").glob("*_0_log.err"))
    assert not [p for p in tmp_path.rglob("*") if "%" in p.name]


@pytest.mark.timeout(300)
def test_a_failed_job_reports_the_failing_rank_s_line(tmp_path: Path) -> None:
    done = submit(
        "--executor",
        "local",
        "--time",
        "5",
        "--tasks-per-node",
        "2",
        f"run_dir={tmp_path / 'run'}",
        *SMALL,
        "train.steps=8",
        "engine.protocol=gramian",
        env={FAULT_ENV: "exit:1:2"},
    )
    assert done.returncode != 0, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist_mtl.train: rank 0: error: ") and "step 2" in last, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["balancer.name=nope"], "dist-mtl: error: balancer.name must be one of"),
        (["optim.lr=inf"], "dist-mtl: error: optim.lr must be a finite number; got inf"),
        (
            ["--tasks-per-node", "2", "engine.task_parallel=3"],
            "dist-mtl: error: engine.task_parallel K=3 does not divide the world size W=2",
        ),
        (["--folder", "logs/%j"], "dist-mtl: error: --folder logs/%j: the local executor does not expand %j"),
        (["run_dir=/proc/no/run"], "dist-mtl: error: run_dir /proc/no/run is not writable"),
        (["--resume", "--overwrite"], "dist-mtl: error: --resume and --overwrite contradict each other"),
    ],
)
def test_bad_input_fails_before_submission_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = submit("--executor", "local", f"run_dir={tmp_path / 'run'}", *args, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not any(tmp_path.iterdir())


def test_a_run_dir_holding_a_run_fails_before_submission(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    done = submit("--executor", "local", f"run_dir={tmp_path}", timeout=120)
    assert done.returncode == 2 and f"run_dir {tmp_path} already holds a run" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_requeue_resumes_from_a_step_checkpoint_without_last_pt(tmp_path: Path) -> None:
    """A preemption between step_*.pt and last.pt: the requeue must resume, not --overwrite the run."""
    from dist_mtl.checkpoint import save_checkpoint
    from dist_mtl.restart import attempt_flags

    requeued = {"SLURM_RESTART_COUNT": "1"}
    assert attempt_flags(str(tmp_path), False, False, {}) == (False, False)  # the first attempt: as given
    assert attempt_flags(str(tmp_path), False, False, requeued) == (False, True)  # nothing yet: restart
    save_checkpoint(tmp_path, 4, {"model": {}})
    (tmp_path / "checkpoints" / "last.pt").unlink()
    assert attempt_flags(str(tmp_path), False, False, requeued) == (True, False)  # resume
