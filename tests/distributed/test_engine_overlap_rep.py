"""`rep` with the shared gradient all-reduced in buckets during the encoder backward (engine.overlap).

On 2 and 3 ranks, with engine.bucket_mb=0.00115 (301 floats: five buckets of the harness's P = 1072
MLP encoder, whose two 512-element weights are each cut in two, and one bucket holding the end of one
weight and a whole bias, so it waits for two parameters' gradients), with overlap off, and with a
loss balancer (famo: the one-backward path), the checkpoint after 4 steps equals the single-process
rep trainer's and the bytes the wrapper accounted on every rank equal the analytic model step by
step, with the buckets taken from the parameter sizes (`StepShape.shared_sizes`). On 3 ranks the ring
all-reduce's integer division makes the per-bucket sum differ from one all-reduce of P, so the
equality there also shows that the buckets, not one collective, moved the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from dist_mtl.build import build_datasets, build_model_for
from dist_mtl.config import load_config
from dist_mtl.engine.buckets import bucket_sizes, cap_elements
from dist_mtl.engine.traffic import F32, StepShape, step_bytes
from tests.distributed.harness import (
    BASE,
    compare,
    load,
    run_worker,
    single_process_references,
)
from tests.distributed.test_engine_contract import REP, accounted_bytes_errors

pytestmark = [pytest.mark.distributed]

TINY = ["engine.bucket_mb=0.00115"]  # 1205 bytes: 301 floats
CASES = {
    "mgda-buckets": [*REP, "balancer.name=mgda", *TINY],
    "mgda-no-overlap": [*REP, "balancer.name=mgda", "engine.overlap=false"],
    "famo-buckets": [*REP, "balancer.name=famo", "balancer.famo_lr=5", *TINY],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], dict]:
    return single_process_references(tmp_path_factory, BASE)


def rep_shape(overrides: list[str], run_dir: Path, world_size: int) -> StepShape:
    """The rep byte model's inputs for a case, the shared parameters' sizes included."""
    cfg = load_config(None, [*BASE, *overrides, f"run_dir={run_dir}"])
    model = build_model_for(cfg, build_datasets(cfg)[0])
    t = model.num_tasks
    sizes = tuple(p.numel() for p in model.shared_parameters())
    return StepShape(
        params=sum(sizes),
        split=(t,),
        replicas=world_size,
        all_head_params=sum(p.numel() for task in range(t) for p in model.head_parameters(task)),
        shared_sizes=sizes,
        **StepShape.engine_options(cfg.engine),
    )


def test_tiny_buckets_are_several_and_change_the_three_rank_byte_model(tmp_path: Path) -> None:
    """The cases exercise what they claim: several buckets, a parameter cut, and a 3-rank byte model
    that tells bucketed from whole."""
    shape = rep_shape(CASES["mgda-buckets"], tmp_path, 3)
    buckets = bucket_sizes(shape.shared_sizes, cap_elements(shape.bucket_bytes, F32))
    assert shape.shared_sizes == (512, 32, 512, 16) and buckets == [16, 301, 211 + 32, 301, 211]
    assert step_bytes("rep", shape, 0) != step_bytes("rep", dataclasses.replace(shape, overlap=False), 0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_bucketed_rep_equals_single_process(world_size: int, tmp_path: Path, reference) -> None:
    spec = [{"overrides": [*BASE, *o, f"run_dir={tmp_path / name}"]} for name, o in CASES.items()]
    run_worker(world_size, {"cases": spec}, tmp_path / "spec.json")
    failures = []
    for name, overrides in CASES.items():
        diffs = compare(load(tmp_path / name / "checkpoints" / "last.pt"), reference(overrides))
        diffs += accounted_bytes_errors(tmp_path / name, overrides, world_size)
        failures += [f"rep{world_size}-{name}: {d}" for d in diffs[:5]]
    assert not failures, "\n".join(failures)
