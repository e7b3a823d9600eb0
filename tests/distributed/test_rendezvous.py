"""A multi-node job on one machine: two torchrun agents (two "nodes") meet in a c10d rendezvous on
loopback, as the agents of a two-node job do over the network, and the job's final checkpoint equals
the single-process trainer's on the same global batches (the engine's contract, within rtol 1e-5,
atol 1e-6). Once with torchrun itself (2 agents x 1 rank, layout 1 x 2), once through
`dist-mtl train --nnodes 2 --nproc 2 --rdzv-endpoint` (2 agents x 2 ranks, layout 2 x 2)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from dist_mtl.engine.fault import FAULT_ENV
from tests.distributed.harness import (
    BASE,
    ROOT,
    compare,
    free_port,
    load,
    rank_env,
    single_process_references,
)

pytestmark = [pytest.mark.distributed]

RUN = [*BASE, "engine.protocol=gramian", "engine.timeout_s=30"]


def agent_env() -> dict[str, str]:
    """The test environment without a rank's variables: each agent sets its workers'."""
    env = rank_env(0, 1, 0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.pop(FAULT_ENV, None)
    return env


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc: the agents start their workers in sessions of their own."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        below = todo.pop()
        kids = [pid for pid, ppid in parent.items() if ppid == below]
        found += kids
        todo += kids
    return found


def run_nodes(
    commands: Sequence[Sequence[str]], log_dir: Path, timeout: float
) -> list[tuple[int | None, str]]:
    """Start every command at once (one per node); wait for all; return (exit code, output) of each.

    Every agent and every worker below it is killed at the end, whatever happened."""
    log_dir.mkdir(exist_ok=True)
    logs = [(log_dir / f"node{i}.txt").open("w") for i in range(len(commands))]
    procs: list[subprocess.Popen[bytes]] = []
    seen: set[int] = set()
    try:
        for cmd, log in zip(commands, logs, strict=True):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=agent_env(),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for p in procs:
                seen |= set(descendants(p.pid))
            time.sleep(0.2)
    finally:
        for p in procs:
            seen |= set(descendants(p.pid))
        for pid in seen:
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for log in logs:
            log.close()
    return [(p.returncode, (log_dir / f"node{i}.txt").read_text()) for i, p in enumerate(procs)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], dict[str, Any]]:
    return single_process_references(tmp_path_factory, RUN)


def assert_nodes_match_one_process(
    results: list[tuple[int | None, str]], run_dir: Path, expected: dict[str, Any]
) -> None:
    outputs = "\n".join(f"--- node {i} (exit {code})\n{output}" for i, (code, output) in enumerate(results))
    assert all(code == 0 for code, _ in results), outputs
    differences = compare(load(run_dir / "checkpoints" / "last.pt"), expected)
    assert not differences, differences


@pytest.mark.timeout(150)
def test_two_torchrun_agents_meet_in_a_c10d_rendezvous_and_train_as_one_job(
    tmp_path: Path, reference: Callable[[list[str]], dict[str, Any]]
) -> None:
    run_dir, endpoint, run_id = tmp_path / "run", f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:8]}"
    overrides = ["engine.replicas=1", "engine.task_parallel=2"]
    agent = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",  # the first agent to bind it hosts the store, the other joins
        f"--rdzv_id={run_id}",
        "--local_addr=127.0.0.1",  # the address its workers are given, not the host name's
        "--monitor_interval=1",
    ]
    commands = [
        [
            *agent,
            f"--log_dir={tmp_path / f'torchrun{i}'}",
            "-m",
            "dist_mtl.train",
            *RUN,
            *overrides,
            f"run_dir={run_dir}",
        ]
        for i in range(2)
    ]
    results = run_nodes(commands, tmp_path / "logs", timeout=120)
    assert_nodes_match_one_process(results, run_dir, reference(overrides))
    summaries = [output for _, output in results if "steps 4  wall" in output]
    assert len(summaries) == 1 and "layout D x K = 1 x 2" in summaries[0], results  # printed by rank 0 only


@pytest.mark.timeout(200)
def test_dist_mtl_train_nnodes_two_runs_a_two_node_job(
    tmp_path: Path, reference: Callable[[list[str]], dict[str, Any]]
) -> None:
    """The same through `dist-mtl train`, 2 ranks per node: W = 4, layout 2 x 2, checked by each node."""
    run_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    overrides = ["engine.replicas=2", "engine.task_parallel=2"]
    node = [
        sys.executable,
        "-m",
        "dist_mtl.cli",
        "train",
        "--nnodes",
        "2",
        "--nproc",
        "2",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        f"test-{uuid.uuid4().hex[:8]}",
        *RUN,
        *overrides,
        f"run_dir={run_dir}",
    ]
    results = run_nodes([node, node], tmp_path / "logs", timeout=170)
    assert_nodes_match_one_process(results, run_dir, reference(overrides))
    assert sum("layout D x K = 2 x 2" in output for _, output in results) == 1, results
