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
# Reasons for which a PENDING job waits for a change of its request or of the cluster's configuration,
# never for other jobs to end (SLURM's "Job Reason Codes"); without EnforcePartLimits, sbatch accepts
# such a job and it waits forever.
NEVER_STARTS = {
    "PartitionConfig": "the partition cannot give what it asks (more CPUs or GPUs per node than a node has?)",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows or has",
    "PartitionTimeLimit": "its --time is over the partition's time limit",
    "BadConstraints": "no node can satisfy its constraints",
    "InvalidAccount": "its --account is not valid",
    "InvalidQOS": "its --qos is not valid",
    "AccountNotAllowed": "its --account may not use this partition",
    "QOSNotAllowed": "its --qos may not use this partition",
}
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
