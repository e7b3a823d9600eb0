"""A rank that dies or stalls mid-run: the others exit non-zero, within the timeout, saying what failed.

The ranks are real `python -m dist_mtl.train` processes (the entry point torchrun runs), started by
the test without torchrun, whose agent would otherwise kill the survivors itself. The fault is
injected with DIST_MTL_FAULT (see dist_mtl/engine/fault.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_mtl.engine.fault import EXIT_CODE, FAULT_ENV
from tests.distributed.harness import BASE, launch

pytestmark = [pytest.mark.distributed]

SLACK_S = 5.0  # process teardown and polling on a loaded 2-core machine


def argv(run_dir: Path, timeout_s: float, *extra: str) -> list[str]:
    return [
        "-m",
        "dist_mtl.train",
        *BASE,
        "train.steps=8",
        f"engine.timeout_s={timeout_s}",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.mark.timeout(120)
def test_dead_rank_fails_the_others_within_the_timeout(tmp_path: Path) -> None:
    timeout_s = 5.0
    runs, _ = launch(
        3, argv(tmp_path, timeout_s, "engine.protocol=gramian"), timeout=100, env={FAULT_ENV: "exit:2:3"}
    )
    dead = runs[2]
    assert dead.returncode == EXIT_CODE, dead.output
    assert dead.ended is not None
    for rank in (0, 1):
        run = runs[rank]
        assert run.returncode == 1, run.output
        assert f"rank {rank}: " in run.output and "failed at step 3" in run.output, run.output
        assert run.ended is not None and run.ended - dead.ended <= timeout_s + SLACK_S


@pytest.mark.timeout(120)
def test_stalled_rank_times_out_the_others(tmp_path: Path) -> None:
    timeout_s = 3.0
    runs, _ = launch(
        2,
        argv(tmp_path, timeout_s, "engine.protocol=gather"),
        timeout=100,
        env={FAULT_ENV: "stall:1:3"},
        kill_after=1.0,
    )
    stalled_at = next(t for t, line in runs[1].lines if "stalling at step 3" in line)
    survivor = runs[0]
    assert survivor.returncode == 1, survivor.output
    assert "rank 0: " in survivor.output and "failed at step 3" in survivor.output, survivor.output
    assert survivor.ended is not None
    # Bounded by the timeout: not before it (the peer is alive, just silent), not much after it.
    assert timeout_s * 0.8 <= survivor.ended - stalled_at <= timeout_s + SLACK_S
