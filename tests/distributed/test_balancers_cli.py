"""End to end: every balancer trains through `dist-mtl train` on one process and on `--nproc 2`
(torchrun), and the two runs end with the same checkpoint (the engine's contract through the CLI). A
loss balancer's 2-rank run logs one encoder backward and no Gramian on every step; a Gramian
balancer's logs the Gramian on every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_mtl.balancers import balancer_needs_gramian
from dist_mtl.cli import main as cli_main
from tests.distributed.harness import BASE, ROOT, compare, load, read_jsonl
from tests.distributed.test_engine_cli import cli_env
from tests.distributed.test_engine_contract import CASE_TOLERANCE

pytestmark = [pytest.mark.distributed]

TASK_PARALLEL = ["engine.replicas=1", "engine.task_parallel=2"]
REPLICAS = ["engine.replicas=2", "engine.task_parallel=1"]
# One layout and protocol per balancer, so that each group covers 1x2, 2x1, gather, gramian and rep.
CASES = {
    "upgrad": [*TASK_PARALLEL, "engine.protocol=gramian"],
    "dualproj": [*REPLICAS, "engine.protocol=gather"],
    "pcgrad": ["balancer.seed=5", *TASK_PARALLEL, "engine.protocol=gather"],
    "cagrad": ["balancer.c=0.5", "train.mode=rep", "engine.protocol=rep"],
    "imtl_g": [*REPLICAS, "engine.protocol=gramian"],
    "aligned_mtl": ["balancer.scale_mode=median", *TASK_PARALLEL, "engine.protocol=gramian"],
    "fairgrad": ["balancer.alpha=2", *TASK_PARALLEL, "engine.protocol=gather"],
    "nash_mtl": ["train.mode=rep", "engine.protocol=rep"],
    "famo": ["balancer.famo_lr=5", "engine.replicas=1", "engine.task_parallel=2", "engine.protocol=gramian"],
    "uw": ["balancer.uw_lr=0.1", "engine.replicas=2", "engine.task_parallel=1", "engine.protocol=gather"],
    "dwa": ["train.mode=rep", "engine.protocol=rep"],
    "rlw": ["balancer.seed=3", "engine.replicas=1", "engine.task_parallel=2", "engine.protocol=gather"],
}
STEPS = ["train.steps=3", "engine.checksum_every=1"]


def dist_mtl_train(run_dir: Path, overrides: list[str], nproc: int) -> subprocess.CompletedProcess[str]:
    """`dist-mtl train ... --nproc N` as a command (torchrun underneath)."""
    argv = [sys.executable, "-m", "dist_mtl.cli", "train", *BASE, *STEPS, *overrides, f"run_dir={run_dir}"]
    argv += ["--nproc", str(nproc)]
    return subprocess.run(argv, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=200)


def dist_mtl_train_here(run_dir: Path, overrides: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`dist-mtl train ...` on one process, through the CLI's own entry point in this process (the
    command without the interpreter's start-up, a few seconds a run on the 2-core CI machine)."""
    code = cli_main(["train", *BASE, *STEPS, *overrides, f"run_dir={run_dir}"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(CASES))
def test_balancer_trains_through_the_cli_on_one_and_two_processes(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [f"balancer.name={name}", *CASES[name]]
    one = dist_mtl_train_here(tmp_path / "one", [o for o in overrides if not o.startswith("engine.")], capsys)
    assert "run directory:" in one
    two = dist_mtl_train(tmp_path / "two", overrides, 2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "run directory:" in two.stdout
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert [s["world_size"] for s in summaries] == [1, 2] and all(s["steps"] == 3 for s in summaries)
    state = ("model", "optimizer", "balancer", "step")
    got, expected = (load(tmp_path / d / "checkpoints" / "last.pt") for d in ("two", "one"))
    diffs = compare(
        {k: got[k] for k in state}, {k: expected[k] for k in state}, **CASE_TOLERANCE.get(name, {})
    )
    assert not diffs, diffs
    if build_fresh_state(name):  # a stateful balancer's state moved over the run
        assert got["balancer"] != build_fresh_state(name)
    loss_only = not balancer_needs_gramian(name)
    for rank in (0, 1):
        records = [r for r in read_jsonl(tmp_path / "two" / "metrics" / f"rank{rank}.jsonl") if "step" in r]
        steps = [r for r in records if "step/gramian" in r]
        assert len(steps) == 3, steps
        if loss_only:
            assert all(r["step/gramian"] == 0.0 and r["step/encoder_backwards"] == 1.0 for r in steps), steps
        else:
            assert all(r["step/gramian"] == 1.0 for r in steps), steps


def build_fresh_state(name: str) -> dict:
    from dist_mtl.balancers import build_balancer

    return build_balancer(name).state_dict()
