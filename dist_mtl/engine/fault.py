"""Fault injection for the dead-rank and stalled-rank tests: DIST_MTL_FAULT=exit:RANK:STEP or stall:RANK:STEP.

`exit` ends the process abruptly at the start of that step (as a crash or an OOM kill would); `stall`
sleeps there for three collective timeouts, long enough for every peer to time out first. Unset (the
normal case) it costs one environment lookup at start-up.

A fault fires once per run: only in the run's first attempt (`dist_mtl.restart.restart_count() == 0`).
An attempt that torchrun (`--max-restarts`) or a SLURM requeue started again resumes from the last
checkpoint and replays the step without dying there again, as a real crash would not recur either.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from dist_mtl.restart import restart_count

FAULT_ENV = "DIST_MTL_FAULT"
EXIT_CODE = 17


def fault_injector(rank: int, timeout_s: float) -> Callable[[int], None] | None:
    """A hook to call with the 1-based step number, or None when no fault targets this rank in this
    attempt (a restarted attempt, restart count > 0, never gets one)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    try:
        kind, target, at = spec.split(":")
        target_rank, at_step = int(target), int(at)
        if kind not in ("exit", "stall"):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{FAULT_ENV} must look like exit:RANK:STEP or stall:RANK:STEP; got {spec!r}"
        ) from None
    if target_rank != rank or restart_count() > 0:
        return None

    def inject(step: int) -> None:
        if step != at_step:
            return
        if kind == "exit":
            print(f"rank {rank}: {FAULT_ENV}: exiting at step {step}", flush=True)
            os._exit(EXIT_CODE)
        print(f"rank {rank}: {FAULT_ENV}: stalling at step {step}", flush=True)
        time.sleep(3 * timeout_s)

    return inject
