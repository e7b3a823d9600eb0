"""Restarted attempts of one run resume it: torchrun's elastic restarts and SLURM requeues.

torchrun (`--max-restarts`) starts the ranks again with TORCHELASTIC_RESTART_COUNT > 0, and a
requeued SLURM job starts its script (or submitit's pickled call) again with SLURM_RESTART_COUNT > 0,
both with the arguments of the first attempt. Such an attempt continues the run from its newest
checkpoint; when the first attempt died before writing one, it replaces the partial run that
attempt left (it is this run's own output, not someone else's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dist_mtl.checkpoint import checkpoint_files

RESTART_COUNT_ENVS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times this run's processes were started again (0 on the first attempt)."""
    env = os.environ if environ is None else environ
    return sum(int(env.get(name) or 0) for name in RESTART_COUNT_ENVS)


def attempt_flags(
    run_dir: str, resume: bool, overwrite: bool, environ: Mapping[str, str] | None = None
) -> tuple[bool, bool]:
    """(resume, overwrite) for this attempt: as given on the first, resume-or-restart on a later one."""
    if restart_count(environ) == 0:
        return resume, overwrite
    has_checkpoint = bool(checkpoint_files(run_dir))
    return has_checkpoint, not has_checkpoint
