"""`rep` with the shared gradient all-reduced in buckets during the encoder backward (engine.overlap).

On 2 and 3 ranks, with engine.bucket_mb=0.001 (262 floats: five buckets of the harness's P = 1072
MLP encoder, one straddling each parameter boundary), with overlap off, and with a loss balancer (famo:
the one-backward path), the checkpoint after 4 steps equals the single-process rep trainer's and the
bytes the wrapper accounted on every rank equal the analytic model step by step. On 3 ranks the ring
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
from dist_mtl.engine.traffic import StepShape, step_bytes
from tests.distributed.harness import BASE, run_worker, single_process_references
from tests.distributed.test_engine_contract import REP, check_cases

pytestmark = [pytest.mark.distributed]

TINY = ["engine.bucket_mb=0.001"]
CASES = {
    "mgda-buckets": [*REP, "balancer.name=mgda", *TINY],
    "mgda-no-overlap": [*REP, "balancer.name=mgda", "engine.overlap=false"],
    "famo-buckets": [*REP, "balancer.name=famo", "balancer.famo_lr=5", *TINY],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], dict]:
    return single_process_references(tmp_path_factory, BASE)


def test_tiny_buckets_are_several_and_change_the_three_rank_byte_model(tmp_path: Path) -> None:
    """The cases exercise what they claim: several buckets, and a model that tells them apart."""
    cfg = load_config(None, [*BASE, *CASES["mgda-buckets"], f"run_dir={tmp_path}"])
    model = build_model_for(cfg, build_datasets(cfg)[0])
    params = sum(p.numel() for p in model.shared_parameters())
    shape = StepShape(params=params, split=(5,), replicas=3, **StepShape.engine_options(cfg.engine))
    assert params > 4 * shape.bucket_bytes // 4
    assert step_bytes("rep", shape, 0) != step_bytes("rep", dataclasses.replace(shape, overlap=False), 0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_bucketed_rep_equals_single_process(world_size: int, tmp_path: Path, reference) -> None:
    cases = {f"rep{world_size}-{name}": overrides for name, overrides in CASES.items()}
    spec = [{"overrides": [*BASE, *o, f"run_dir={tmp_path / name}"]} for name, o in cases.items()]
    run_worker(world_size, {"cases": spec}, tmp_path / "spec.json")
    check_cases(tmp_path, cases, reference, world_size)
