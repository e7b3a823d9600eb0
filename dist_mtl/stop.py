"""Stop at a step boundary when the cluster asks: preemption, `scontrol requeue`, the pre-timeout signal.

Inside a SLURM job (SLURM_JOB_ID set) the trainer installs these handlers for the run:

- SIGTERM: SLURM is ending the job (preemption, `scontrol requeue`, `scancel`, time limit). It
  requeues the job by itself where that applies; the run checkpoints and exits.
- SIGUSR1 / SIGUSR2: the pre-timeout signal (`--signal=USR1@S` in the sbatch scripts, submitit's
  USR2). The run checkpoints, rank 0 asks SLURM to requeue the job, and every rank exits.

A handler only records the request: the ranks agree on the step to stop after (`Backend.stop_vote`)
and write one checkpoint there, so the requeued job resumes exactly where this one stopped. Outside
SLURM nothing is installed and SIGTERM keeps its default meaning. Repeated signals do not escalate:
SLURM (after KillWait) and torchrun (after its shutdown timeout) kill a rank that does not stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType

from dist_mtl.errors import TrainingFailed

# Stop reasons, ordered: the ranks agree on the largest one any of them saw.
CONTINUE, TERMINATE, REQUEUE = 0, 1, 2
REASON_SIGNALS = {
    signal.SIGTERM: TERMINATE,
    signal.SIGUSR1: REQUEUE,
    signal.SIGUSR2: REQUEUE,
}
# Exit code of a rank that stopped on request after writing its checkpoint (EX_TEMPFAIL: "try again").
STOPPED_EXIT = 75


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get("SLURM_JOB_ID"))


class StopRequest:
    """The largest stop reason received by this process so far (CONTINUE when none)."""

    def __init__(self) -> None:
        self.reason = CONTINUE
        self.signal_name = ""

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        reason = REASON_SIGNALS[signal.Signals(signum)]
        if reason > self.reason:
            self.reason, self.signal_name = reason, signal.Signals(signum).name

    @contextmanager
    def installed(self, enabled: bool | None = None) -> Iterator[StopRequest]:
        """Handle the stop signals for the duration (by default only inside a SLURM job)."""
        if not (in_slurm_job() if enabled is None else enabled):
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in REASON_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class RunStopped(Exception):
    """The run stopped on request after checkpointing `step`; a later attempt resumes it."""

    def __init__(self, step: int, reason: int, signal_name: str) -> None:
        self.step, self.reason, self.signal_name = step, reason, signal_name
        then = "the job is requeued" if reason == REQUEUE else "SLURM requeues the job if it was preempted"
        super().__init__(
            f"stopped by {signal_name or 'a peer rank'} after step {step}: checkpoint written, {then}; "
            "the next attempt resumes from it"
        )


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str:
    """The id `scontrol requeue` takes: ARRAYID_TASK for an array task, else SLURM_JOB_ID."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue_this_job() -> None:
    """Ask SLURM to requeue the job this process runs in (SLURM then ends it with SIGTERM)."""
    job = slurm_job_id()
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise TrainingFailed(
            f"scontrol requeue {job} failed ({done.stderr.strip() or done.returncode}); the checkpoint is "
            "written: resubmit the job with --resume (does the partition allow requeue? JobRequeue=1 or "
            "sbatch --requeue)"
        )
