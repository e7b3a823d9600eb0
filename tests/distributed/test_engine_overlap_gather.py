"""`gather` and `sketch` with each task's row sent to the coordinator as its backward ends (engine.overlap).

On 1x3, 3x1 and 2x2 (T = 5: rank splits (2, 2, 1) and (3, 2), so some rounds carry fewer than K rows;
one 1x3 case with engine.split=[1,2,2], where the coordinator has fewer tasks than the ranks it
receives from), with overlap on and off: lossless `gather` equals the single-process trainer after 4
Adam steps; the lossy codecs (top-k, and the count-sketch of `sketch`), whose Gramian the coordinator
forms a round at a time with overlap and at once without, give the same checkpoint either way within
float32 tolerance; and on every rank the bytes the wrapper accounted equal the analytic model of the
configured option step by step. The shapes are such that the two models differ (unpadded rows, and
per-row replica all-reduces whose integer division on D = 3 differs from one of the whole block), so
the equality shows which exchange ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from dist_mtl.engine.traffic import StepShape, step_bytes
from tests.distributed.harness import BASE, compare, load, run_worker, single_process_references
from tests.distributed.test_engine_contract import accounted_bytes_errors, check_cases

pytestmark = [pytest.mark.distributed]

OFF = ["engine.overlap=false"]
PROTOCOLS = {
    "gather": ["engine.protocol=gather"],
    "topk": ["engine.protocol=gather", "engine.compression=topk", "engine.topk_ratio=0.1"],
    "sketch": ["engine.protocol=sketch", "engine.sketch_size=256"],
}
LAYOUTS = {3: [(1, 3), (3, 1)], 4: [(2, 2)]}
LOSSY = ("topk", "sketch")


def cases(world_size: int) -> dict[str, list[str]]:
    """Name -> overrides; names are D x K-balancer-protocol-on|off (the balancer second, as
    `check_cases` reads it). 3x1 runs lossless gather only (its lossy codecs are the 1x3 code path)."""
    out: dict[str, list[str]] = {}
    for d, k in LAYOUTS[world_size]:
        layout = [f"engine.replicas={d}", f"engine.task_parallel={k}", "balancer.name=mgda"]
        for name, options in PROTOCOLS.items():
            if k == 1 and name != "gather":
                continue
            out[f"{d}x{k}-mgda-{name}-on"] = [*layout, *options]
            out[f"{d}x{k}-mgda-{name}-off"] = [*layout, *options, *OFF]
    if world_size == 3:
        out["1x3-getmtl-gather-split"] = [
            "engine.replicas=1",
            "engine.task_parallel=3",
            "engine.split=[1,2,2]",
            "balancer.name=getmtl",
            "engine.protocol=gather",
        ]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], dict]:
    return single_process_references(tmp_path_factory, BASE)


@pytest.mark.parametrize(
    ("protocol", "split", "replicas"),
    [("gather", (2, 2, 1), 1), ("sketch", (2, 2, 1), 1), ("gather", (5,), 3), ("topk", (3, 2), 2)],
)
def test_the_overlapped_byte_model_differs(protocol: str, split: tuple[int, ...], replicas: int) -> None:
    """The cases below tell the two exchanges apart by their bytes: no padded rows with overlap, and
    with D = 3 per-row all-reduces that round differently from one of the block."""
    options = PROTOCOLS[protocol]
    shape = StepShape(
        params=1072,
        split=split,
        replicas=replicas,
        head_params=tuple(17 * n for n in split),
        compression="topk" if "engine.compression=topk" in options else "none",
        topk_ratio=0.1,
        sketch_size=256,
        overlap=True,
    )
    name = "sketch" if protocol == "sketch" else "gather"
    world = replicas * len(split)
    on = [step_bytes(name, shape, r) for r in range(world)]
    off = [step_bytes(name, dataclasses.replace(shape, overlap=False), r) for r in range(world)]
    assert on != off


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3, 4])
def test_overlapped_gather_equals_reference_and_lossy_on_equals_off(
    world_size: int, tmp_path: Path, reference
) -> None:
    all_cases = cases(world_size)
    spec = [{"overrides": [*BASE, *o, f"run_dir={tmp_path / name}"]} for name, o in all_cases.items()]
    run_worker(world_size, {"cases": spec}, tmp_path / "spec.json")
    lossless = {n: o for n, o in all_cases.items() if "-gather-" in n}
    check_cases(tmp_path, lossless, reference, world_size)
    failures = []
    for name, overrides in all_cases.items():
        if name.endswith("-on") and name.split("-")[2] in LOSSY:
            off = name.removesuffix("-on") + "-off"
            diffs = compare(
                load(tmp_path / name / "checkpoints" / "last.pt"),
                load(tmp_path / off / "checkpoints" / "last.pt"),
            )
            failures += [f"{name} vs {off}: {d}" for d in diffs[:5]]
        if name.split("-")[2] in LOSSY:
            failures += [
                f"{name}: {e}" for e in accounted_bytes_errors(tmp_path / name, overrides, world_size)
            ]
    assert not failures, "\n".join(failures)
