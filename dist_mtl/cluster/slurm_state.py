"""A SLURM job's state from the controller (`scontrol show job`), which works without accounting.

submitit asks `sacct`, which needs accounting storage; without it every state reads UNKNOWN, so a
job that died without writing a result would be waited for forever. The controller knows the state
of running jobs and of finished ones for MinJobAge seconds (300 by default).
"""

from __future__ import annotations

import re
import subprocess

# States after which the job will not write a result any more (REQUEUED / PREEMPTED jobs come back).
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
GONE = "GONE"  # the controller no longer knows the job (finished more than MinJobAge ago)
_STATE = re.compile(r"\bJobState=(\S+)")
_REASON = re.compile(r"\bReason=(\S+)")


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of `job_id`; (GONE, "") when the controller has forgotten it."""
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return GONE, ""
        raise RuntimeError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
    state = _STATE.search(done.stdout)
    reason = _REASON.search(done.stdout)
    return (state.group(1) if state else "UNKNOWN"), (reason.group(1) if reason else "")
