"""`gather` and `sketch` with each task's row sent to the coordinator as its backward ends (engine.overlap).

On 1x3, 3x1 and 2x2 (T = 5: rank splits (2, 2, 1) and (3, 2), so some rounds carry fewer than K rows;
one 1x3 case with engine.split=[1,2,2], where the coordinator has fewer tasks than the ranks it
receives from), with overlap on and off: lossless `gather` equals the single-process trainer after 4
Adam steps; the lossy codecs (top-k, and the count-sketch of `sketch`), whose Gramian the coordinator
forms a round at a time with overlap and at once without, give the same checkpoint either way within
float32 tolerance; and on every rank the bytes the wrapper accounted equal the analytic model of the
configured option step by step. The shapes are such that the two models differ (unpadded rows, and
per-row replica all-reduces whose integer division on D = 3 differs from one of the whole block), so
the equality shows which exchange ran. Without processes: the overlapped model conserves bytes, and
every codec's per-row encoding and round-at-a-time Gramian equal its whole-block ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dist_mtl.engine.codecs import build_codec
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


@pytest.mark.parametrize("layout", [(1, 2), (1, 3), (2, 2), (3, 1), (2, 3)])
@pytest.mark.parametrize("protocol", ["gather", "topk", "sketch"])
def test_the_overlapped_byte_model_conserves_bytes(protocol: str, layout: tuple[int, int]) -> None:
    """What the senders' rounds send is what the coordinator's receives take (every D and K)."""
    d, k = layout
    split = tuple(7 // k + (1 if i < 7 % k else 0) for i in range(k))
    shape = StepShape(
        params=10_001,
        split=split,
        replicas=d,
        head_params=tuple(5 * n for n in split),
        compression="topk" if protocol == "topk" else "none",
        overlap=True,
    )
    moved = [step_bytes("sketch" if protocol == "sketch" else "gather", shape, r) for r in range(d * k)]
    assert sum(s for s, _ in moved) == sum(r for _, r in moved)


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "topk", "countsketch"])
def test_codec_rows_a_round_at_a_time_equal_its_gramian(name: str) -> None:
    """The overlapped coordinator's pieces: each row encoded on its own into a preallocated wire equals
    the block's encoding, the lower triangle formed a round of K rows at a time and mirrored equals
    the codec's Gramian, and the losses decode bit-exact."""
    torch.manual_seed(0)
    rows_per_round, rounds, params = 3, 4, 200
    grads = torch.randn(rows_per_round * rounds, params)
    losses = torch.rand(rows_per_round * rounds)
    rows = torch.cat([grads, losses[:, None]], dim=1)
    codec = build_codec(
        name, params=params, topk_ratio=0.1, sketch_size=32, sketch_seed=1, device=torch.device("cpu")
    )
    whole = codec.encode(rows).clone()
    wire = torch.zeros_like(whole)
    for i in range(rows.shape[0]):
        codec.encode(rows[i : i + 1], out=wire[i : i + 1])
    assert torch.equal(wire, whole)
    m = torch.zeros(rows.shape[0], rows.shape[0])
    for i in range(rounds):
        codec.gramian_rows(wire, i * rows_per_round, (i + 1) * rows_per_round, m)
    m = torch.tril(m) + torch.tril(m, -1).T
    expected, expected_losses = codec.gramian(wire)
    assert torch.allclose(m, expected, rtol=1e-5, atol=1e-5 * float(expected.diagonal().max()))
    assert torch.equal(codec.losses(wire), expected_losses)
    assert torch.equal(codec.losses(wire), losses)


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
