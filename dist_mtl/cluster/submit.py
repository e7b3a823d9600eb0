"""Submit a run through submitit, wait for it, print its summary or the failing rank's error.

`--executor slurm` submits an sbatch job: one task per rank (`--ntasks-per-node`), the pre-timeout
signal (USR2, `--signal-delay` seconds before the limit) and `--requeue`, so a preempted, requeued
or timed-out job continues from the checkpoint it wrote when told to stop (`dist_mtl.stop`).
`local` runs the same path as processes on this machine; `debug` runs one rank in this process.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError
from submitit.slurm.slurm import _make_sbatch_string

from dist_mtl.cluster.job import TrainJob
from dist_mtl.cluster.options import LaunchOptions
from dist_mtl.cluster.slurm_state import GONE, NEVER_STARTS, TERMINAL, job_state
from dist_mtl.config import RunConfig
from dist_mtl.errors import ConfigError, TrainingFailed

_RANK_ERROR = re.compile(r"dist_mtl\.train: (?:rank \d+: )?error: .*")
POLL_S = 2.0
# After SLURM says the job ended, how long its result files may take to appear (shared filesystems).
RESULT_GRACE_S = 15.0


def log_folder(opts: LaunchOptions, cfg: RunConfig) -> Path:
    """RUN_DIR/submitit unless --folder."""
    folder = Path(opts.folder) if opts.folder else Path(cfg.run_dir) / "submitit"
    return folder.expanduser().absolute()  # as submitit keeps it


def slurm_parameters(opts: LaunchOptions) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (its names; what the sbatch script gets)."""
    params: dict[str, Any] = {
        "job_name": opts.name,
        "time": opts.time_min,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_node,
        "cpus_per_task": opts.cpus_per_task,
        "signal_delay_s": opts.signal_delay_s,
        "additional_parameters": {"requeue": True},
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos, "mem": opts.mem}
    return params | {key: value for key, value in optional.items() if value}


def job_command(folder: Path) -> str:
    """What the sbatch script runs on every task (submitit's loader of the pickled job)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(opts: LaunchOptions, folder: Path) -> str:
    """The sbatch script `--executor slurm` submits (submitit writes exactly this text)."""
    return _make_sbatch_string(command=job_command(folder), folder=folder, **slurm_parameters(opts))


def build_executor(opts: LaunchOptions, folder: Path) -> submitit.Executor:
    if opts.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(opts))
        return executor
    if opts.executor == "debug":
        executor = submitit.DebugExecutor(folder=folder)
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(
        timeout_min=opts.time_min,
        tasks_per_node=opts.tasks_per_node,
        gpus_per_node=opts.gpus_per_node,
        signal_delay_s=opts.signal_delay_s,
    )
    return executor


def submit(
    opts: LaunchOptions,
    folder: Path,
    config: str | None,
    overrides: list[str],
    *,
    resume: bool,
    overwrite: bool,
) -> submitit.Job:
    """Submit; a submission SLURM refuses raises ConfigError with SLURM's own message."""
    try:
        return build_executor(opts, folder).submit(TrainJob(), config, overrides, resume, overwrite)
    except (FailedSubmissionError, FailedJobError) as exc:
        message = str(exc).strip()
        said = re.findall(r"sbatch: error: (.*)", message)
        raise ConfigError(
            f"SLURM refused the job: {'; '.join(said) if said else message.splitlines()[-1]} "
            "(see README, 'Troubleshooting SLURM')"
        ) from None


def _result_files(job: submitit.Job) -> list[Path]:
    return [job.task(i).paths.result_pickle for i in range(job.num_tasks)]


def wait_for_slurm_job(job: submitit.Job, poll_s: float = POLL_S) -> None:
    """Return once every task's result is written; raise TrainingFailed when the job ended without.

    Polls the result files and `scontrol` (not sacct: see `slurm_state`), so it needs no accounting
    storage and never waits for a job that died. REQUEUED / PENDING after a stop is waiting, not an end;
    PENDING for a reason that no other job's end can clear (`NEVER_STARTS`) is a ConfigError, and the
    job is cancelled.
    """
    ended_at: float | None = None
    stuck = 0
    while True:
        if all(path.exists() for path in _result_files(job)):
            return
        state, reason = job_state(job.job_id)
        stuck = stuck + 1 if state == "PENDING" and reason in NEVER_STARTS else 0
        if stuck >= 2:  # seen on two polls: the scheduler's settled view, not a passing one
            job.cancel(check=False)
            raise ConfigError(
                f"job {job.job_id} can never start: SLURM keeps it PENDING with Reason={reason}: "
                f"{NEVER_STARTS[reason]}. Cancelled it; change the request (--nodes, --tasks-per-node, "
                "--cpus-per-task, --gpus-per-node, --time, --partition, --account, --qos; see README, "
                "'Troubleshooting SLURM')"
            )
        if state in TERMINAL or state == GONE:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_S:
                why = f" ({reason})" if reason and reason != "None" else ""
                raise TrainingFailed(f"job {job.job_id} ended {state}{why} without a result")
        else:
            ended_at = None
        time.sleep(poll_s)


def _job_stderr(job: submitit.Job) -> str:
    texts = []
    for i in range(job.num_tasks):
        path = job.task(i).paths.stderr
        if path.exists():
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def report(job: submitit.Job, cfg: RunConfig, opts: LaunchOptions) -> int:
    """Wait; print the summary, or the failing rank's own error line (not a pickled traceback)."""
    try:
        if opts.executor == "slurm":
            wait_for_slurm_job(job)
        codes = [int(code or 0) for code in job.results()]
        fallback = f"job {job.job_id} failed with exit code {max(codes)}"
    except (UncompletedJobError, FailedJobError, TrainingFailed) as exc:
        codes, fallback = [1], (str(exc).strip().splitlines() or ["job failed"])[-1]
    if max(codes) == 0:
        from dist_mtl.trainer import format_summary

        print(format_summary(json.loads((Path(cfg.run_dir) / "summary.json").read_text())))
        print(f"run directory: {cfg.run_dir}")
        return 0
    errors = dict.fromkeys(_RANK_ERROR.findall(_job_stderr(job)))
    for line in errors or [f"dist-mtl: error: {fallback} (logs: {job.paths.folder})"]:
        print(line, file=sys.stderr)
    return max(codes)
