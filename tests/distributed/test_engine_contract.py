"""The engine's contract (DESIGN section 5): distributed training equals the single-process reference.

For every layout D x K in {1x2, 1x3, 1x4, 2x2, 2x1} (T = 5, so K never divides T), every balancer and
both lossless protocols (gather without compression, gramian), the checkpoint after 4 Adam steps
(every parameter, every head's optimizer state, the balancer state) equals the single-process
trainer's exact mode on the same global batches within rtol 1e-5, atol 1e-6; `rep` on W = 2, 3, 4
ranks equals the single-process rep mode. Replicated parameters are compared across ranks by
checksum after every step of every case, and the bytes the collective wrapper accounted on every
rank equal the analytic count of `traffic.step_bytes`.

The one-backward path (issue 10): loss balancers (famo, uw, dwa, rlw) on 1x2 and 2x1 with gather and
gramian and on 2-rank rep, balancer.update_every=3 (also resumed mid-period) and balancer.task_sample
equal the single-process trainer in the same way, and their accounted bytes equal the one-backward
byte model step by step (no Gramian, no task gradient moves; every rank logs one encoder backward).

One launch per world size (W = 2, 3, 4) runs all of its cases in sequence; the references are
computed once in this process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dist_mtl.build import build_datasets, build_model_for
from dist_mtl.config import load_config
from dist_mtl.engine.traffic import StepShape, all_gather_bytes, step_bytes
from tests.distributed.harness import BASE, compare, load, read_jsonl, run_worker, single_process_references

pytestmark = [pytest.mark.distributed]

LAYOUTS = {2: [(1, 2), (2, 1)], 3: [(1, 3)], 4: [(1, 4), (2, 2)]}
BALANCERS = ("uniform", "mgda", "getmtl", "mamg")
# The other Gramian balancers: each on 1x3 and 2x2 (one protocol each, alternating) and on rep4, not
# the full cross product; options away from their defaults where they have any.
MORE_BALANCERS = {
    "upgrad": [],
    "dualproj": [],
    "pcgrad": ["balancer.seed=4"],
    "cagrad": ["balancer.c=0.5"],
    "imtl_g": [],
    "aligned_mtl": ["balancer.scale_mode=rmse"],
    "fairgrad": ["balancer.alpha=2"],
    "nash_mtl": [],
}
LOSSLESS = ("gather", "gramian")
REP = ["train.mode=rep", "engine.protocol=rep"]
SPLIT = ["engine.split=[4,1]"]  # a configured, unbalanced split on the 1 x 2 layout
STEPS = 4
# 90% of the labels missing (-1): about 2.4 of a global batch's 24 samples are labelled per task, so
# some steps have a task with no label at all (a zero Gramian row) and the two replicas' parts hold
# different labelled counts, which the losses must weigh by the global counts.
MISSING = ["data.missing_labels=0.9"]
MISSING_CASES = {
    "missing-2x2-gramian-mgda": [
        *MISSING,
        "engine.replicas=2",
        "engine.task_parallel=2",
        "balancer.name=mgda",
        "engine.protocol=gramian",
    ],
    "missing-2x2-gather-getmtl": [
        *MISSING,
        "engine.replicas=2",
        "engine.task_parallel=2",
        "balancer.name=getmtl",
        "engine.protocol=gather",
    ],
    "missing-rep4-mgda": [*MISSING, *REP, "balancer.name=mgda"],
}


# The one-backward path and the levers, on 2 ranks: a few cases, not the cross product.
SINGLE_BACKWARD_CASES = {
    "lb-1x2-famo-gramian": [
        "engine.replicas=1",
        "engine.task_parallel=2",
        "balancer.name=famo",
        "balancer.famo_lr=5",
        "engine.protocol=gramian",
    ],
    "lb-2x1-uw-gather": [
        "engine.replicas=2",
        "engine.task_parallel=1",
        "balancer.name=uw",
        "balancer.uw_lr=0.1",
        "engine.protocol=gather",
    ],
    "lb-1x2-dwa-gather": [
        "engine.replicas=1",
        "engine.task_parallel=2",
        "balancer.name=dwa",
        "engine.protocol=gather",
    ],
    "lb-2x1-rlw-gramian": [
        "engine.replicas=2",
        "engine.task_parallel=1",
        "balancer.name=rlw",
        "engine.protocol=gramian",
    ],
    "lb-rep2-famo": [*REP, "balancer.name=famo", "balancer.famo_lr=5"],
    "every3-1x2-mgda-gramian": [
        "engine.replicas=1",
        "engine.task_parallel=2",
        "balancer.name=mgda",
        "balancer.update_every=3",
        "engine.protocol=gramian",
    ],
    "every3-2x1-famo-gather": [
        "engine.replicas=2",
        "engine.task_parallel=1",
        "balancer.name=famo",
        "balancer.update_every=3",
        "engine.protocol=gather",
    ],
    "every3-rep2-mamg": [*REP, "balancer.name=mamg", "balancer.update_every=3"],
    "sample3-2x1-mgda-gather": [
        "engine.replicas=2",
        "engine.task_parallel=1",
        "balancer.name=mgda",
        "balancer.task_sample=3",
        "engine.protocol=gather",
    ],
    "sample2-1x2-mamg-gramian": [
        "engine.replicas=1",
        "engine.task_parallel=2",
        "balancer.name=mamg",
        "balancer.task_sample=2",
        "balancer.seed=3",
        "engine.protocol=gramian",
    ],
}
# update_every=3 resumed from the checkpoint of step 2, between two updates (solved at step 1, step 2
# reused the kept coefficients, step 3 reuses them after the resume, step 4 solves).
EVERY_RESUME = [
    "engine.replicas=1",
    "engine.task_parallel=2",
    "balancer.name=getmtl",
    "balancer.update_every=3",
    "engine.protocol=gramian",
    "train.checkpoint_every=1",
]


def step_kind(overrides: list[str], step: int) -> str:
    """What 1-based step `step` of a run did (`dist_mtl.solve.step_plan`), from the config alone: no
    step of these runs is skipped, so updates fall on steps 1, N + 1, 2N + 1, ..."""
    from dist_mtl.balancers import balancer_needs_gramian

    cfg = load_config(None, [*BASE, *overrides])
    if (step - 1) % cfg.balancer.update_every:
        return "reuse"
    return "gramian" if balancer_needs_gramian(cfg.balancer.name) else "losses"


def layout_overrides(d: int, k: int) -> list[str]:
    return [f"engine.replicas={d}", f"engine.task_parallel={k}"]


def exact_cases(d: int, k: int) -> dict[str, list[str]]:
    return {
        f"{d}x{k}-{b}-{p}": [*layout_overrides(d, k), f"balancer.name={b}", f"engine.protocol={p}"]
        for b in BALANCERS
        for p in LOSSLESS
    }


# IMTL-G solves a linear system in M, so the float32 reduction order of a distributed Gramian (relative
# differences ~1e-7 against one process's; the overlapped exchange sums it chunk by chunk) reaches c
# amplified by cond(M); measured 2.3e-6 on the weights after 4 steps of 1x3 gather, 4.75e-6 after 3
# steps of 2x1 gramian with overlap (test_balancers_cli.py). Ten times the default tolerance, for it
# alone.
CASE_TOLERANCE = {"imtl_g": {"rtol": 1e-4, "atol": 1e-5}}


def more_balancer_cases(world_size: int) -> dict[str, list[str]]:
    """MORE_BALANCERS on 1x3 (world 3), 2x2 and rep (world 4), protocols alternating per balancer."""
    cases: dict[str, list[str]] = {}
    for i, (b, options) in enumerate(MORE_BALANCERS.items()):
        if world_size == 3:
            p = LOSSLESS[i % 2]
            cases[f"1x3-{b}-{p}"] = [
                *layout_overrides(1, 3),
                f"balancer.name={b}",
                *options,
                f"engine.protocol={p}",
            ]
        if world_size == 4:
            p = LOSSLESS[(i + 1) % 2]
            cases[f"2x2-{b}-{p}"] = [
                *layout_overrides(2, 2),
                f"balancer.name={b}",
                *options,
                f"engine.protocol={p}",
            ]
            cases[f"rep4-{b}"] = [*REP, f"balancer.name={b}", *options]
    return cases


def sketch_cases() -> dict[str, list[str]]:
    """Every registered balancer on the lossy sketch protocol, 1 x 2 (see its test)."""
    from dist_mtl.balancers import BALANCER_NAMES

    return {
        f"sketch-1x2-{b}": [*layout_overrides(1, 2), f"balancer.name={b}", "engine.protocol=sketch"]
        for b in BALANCER_NAMES
    }


# Issue 8's engine options away from their defaults (overlap with 4 chunks per task and the sharded
# optimizer are on by default, so every case above runs them): the exchange in one all-to-all after the
# last backward, 1 or 3 overlap chunks, the full optimizer on every rank, and the bfloat16 wire (lossy:
# its weights' error bound is derived and checked in test_engine_lossy.py; here D > 1 and K = 3 must
# train, account their bytes and stay within WIRE_TOLERANCE of the exact run).
ENGINE_OPTION_CASES = {
    3: {
        "atonce-1x3-getmtl-gramian": [
            *layout_overrides(1, 3),
            "balancer.name=getmtl",
            "engine.overlap=false",
        ],
        "unsharded-1x3-mgda-gramian": [
            *layout_overrides(1, 3),
            "balancer.name=mgda",
            "engine.shard_optimizer=false",
        ],
        "chunks1-1x3-upgrad-gramian": [
            *layout_overrides(1, 3),
            "balancer.name=upgrad",
            "engine.overlap_chunks=1",
        ],
        "wire-1x3-mgda-gramian": [
            *layout_overrides(1, 3),
            "balancer.name=mgda",
            "engine.wire_dtype=bfloat16",
        ],
    },
    4: {
        "atonce-2x2-mgda-gramian": [*layout_overrides(2, 2), "balancer.name=mgda", "engine.overlap=false"],
        "chunks3-2x2-getmtl-gramian": [
            *layout_overrides(2, 2),
            "balancer.name=getmtl",
            "engine.overlap_chunks=3",
        ],
        "unsharded-2x2-mamg-gramian": [
            *layout_overrides(2, 2),
            "balancer.name=mamg",
            "engine.shard_optimizer=false",
        ],
        "wire-2x2-mgda-gramian": [
            *layout_overrides(2, 2),
            "balancer.name=mgda",
            "engine.wire_dtype=bfloat16",
        ],
        "wire-2x2-mgda-gramian-atonce": [
            *layout_overrides(2, 2),
            "balancer.name=mgda",
            "engine.wire_dtype=bfloat16",
            "engine.overlap=false",
        ],
    },
}
WIRE_TOLERANCE = {"rtol": 1e-2, "atol": 1e-3}


def world_cases(world_size: int) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    cases |= {name: {"overrides": o} for name, o in ENGINE_OPTION_CASES.get(world_size, {}).items()}
    for d, k in LAYOUTS[world_size]:
        cases |= {name: {"overrides": o} for name, o in exact_cases(d, k).items()}
    cases |= {f"rep{world_size}-{b}": {"overrides": [*REP, f"balancer.name={b}"]} for b in BALANCERS}
    if world_size == 2:
        cases |= {name: {"overrides": o} for name, o in SINGLE_BACKWARD_CASES.items()}
        cases["every3-resume"] = {"overrides": EVERY_RESUME, "resume_at": 2}
        cases |= {name: {"overrides": o} for name, o in sketch_cases().items()}
        for p in LOSSLESS:
            cases[f"split-{p}"] = {
                "overrides": [*layout_overrides(1, 2), *SPLIT, "balancer.name=mgda", f"engine.protocol={p}"]
            }
    if world_size == 4:
        cases |= {name: {"overrides": o} for name, o in MISSING_CASES.items()}
        cases["resume"] = {
            "overrides": [
                *layout_overrides(2, 2),
                "balancer.name=mgda",
                "engine.protocol=gramian",
                "engine.checksum_every=2",
                "train.checkpoint_every=1",
            ],
            "resume_at": 2,
        }
    cases |= {name: {"overrides": o} for name, o in more_balancer_cases(world_size).items()}
    if world_size == 3:
        cases["divergence"] = {"overrides": layout_overrides(1, 3), "kind": "divergence"}
    return cases


def with_run_dir(overrides: list[str], run_dir: Path) -> list[str]:
    return [*BASE, *overrides, f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Launch W ranks once per world size; returns the directory holding one run directory per case."""
    done: dict[int, Path] = {}

    def get(world_size: int) -> Path:
        if world_size not in done:
            out = tmp_path_factory.mktemp(f"world{world_size}")
            cases = [
                {**case, "overrides": with_run_dir(case["overrides"], out / name)}
                for name, case in world_cases(world_size).items()
            ]
            run_worker(world_size, {"cases": cases}, out / "spec.json")
            done[world_size] = out
        return done[world_size]

    return get


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], dict]:
    """The single-process trainer's final checkpoint for the given overrides (layout overrides ignored)."""
    return single_process_references(tmp_path_factory, BASE)


def accounted_bytes_errors(run_dir: Path, overrides: list[str], world_size: int) -> list[str]:
    """Bytes the wrapper accounted per step and rank against the analytic count (plus the checksum)."""
    cfg = load_config(None, with_run_dir(overrides, run_dir))
    train_set, _ = build_datasets(cfg)
    model = build_model_for(cfg, train_set)
    t = model.num_tasks
    d, k = (
        (world_size, 1) if cfg.engine.protocol == "rep" else (cfg.engine.replicas, cfg.engine.task_parallel)
    )
    split = tuple(cfg.engine.split) or tuple(t // k + (1 if i < t % k else 0) for i in range(k))
    starts = [sum(split[:i]) for i in range(k)]
    head = [
        sum(p.numel() for task in range(s, s + n) for p in model.head_parameters(task))
        for s, n in zip(starts, split, strict=True)
    ]
    shape = StepShape(
        params=sum(p.numel() for p in model.shared_parameters()),
        split=split,
        replicas=d,
        head_params=tuple(head),
        all_head_params=sum(head),
        shared_sizes=tuple(p.numel() for p in model.shared_parameters()),
        **StepShape.engine_options(cfg.engine),
    )
    errors = []
    for rank in range(world_size):
        for record in read_jsonl(run_dir / "metrics" / f"rank{rank}.jsonl"):
            if "bytes_sent/total" not in record:
                continue
            kind = step_kind(overrides, record["step"])
            expected = step_bytes(cfg.engine.protocol, dataclasses.replace(shape, kind=kind), rank)
            backwards = 1.0 if kind != "gramian" or cfg.engine.protocol == "rep" else float(split[rank % k])
            if record.get("step/encoder_backwards") != backwards:
                errors.append(
                    f"rank {rank} step {record['step']} ({kind}): {record.get('step/encoder_backwards')} "
                    f"encoder backward passes, expected {backwards}"
                )
            check = (
                all_gather_bytes(16, world_size)
                if record["step"] % cfg.engine.checksum_every == 0
                else (0, 0)
            )
            want = (expected[0] + check[0], expected[1] + check[1])
            got = (record["bytes_sent/total"], record["bytes_recv/total"])
            if got != want:
                errors.append(
                    f"rank {rank} step {record['step']}: accounted (sent, recv) {got} != analytic {want}"
                )
    return errors


def check_cases(
    out: Path, cases: dict[str, list[str]], reference: Callable[[list[str]], dict], world_size: int
) -> None:
    failures = []
    for name, overrides in cases.items():
        got = load(out / name / "checkpoints" / "last.pt")
        diffs = compare(got, reference(overrides), **CASE_TOLERANCE.get(name.split("-")[1], {}))
        diffs += accounted_bytes_errors(out / name, overrides, world_size)
        failures += [f"{name}: {d}" for d in diffs[:5]]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout", [(1, 2), (1, 3), (1, 4), (2, 2), (2, 1)], ids=lambda dk: f"{dk[0]}x{dk[1]}"
)
def test_lossless_protocols_equal_single_process_exact_mode(layout, distributed_runs, reference) -> None:
    d, k = layout
    check_cases(distributed_runs(d * k), exact_cases(d, k), reference, d * k)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rep_equals_single_process_rep_mode(world_size, distributed_runs, reference) -> None:
    cases = {f"rep{world_size}-{b}": [*REP, f"balancer.name={b}"] for b in BALANCERS}
    check_cases(distributed_runs(world_size), cases, reference, world_size)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3, 4])
def test_every_other_gramian_balancer_equals_single_process(world_size, distributed_runs, reference) -> None:
    """UPGrad, DualProj, PCGrad, CAGrad, IMTL-G, Aligned-MTL, FairGrad, Nash-MTL on 1x3, 2x2 and rep4."""
    check_cases(distributed_runs(world_size), more_balancer_cases(world_size), reference, world_size)


@pytest.mark.timeout(300)
def test_every_balancer_trains_through_the_sketch_protocol(distributed_runs) -> None:
    """The sketch protocol hands the balancer an approximate Gramian (its error is bounded for MGDA in
    test_engine_lossy.py), so no single-process equality here: every balancer must train through it
    with finite parameters, move its state if it has one, and account the analytic bytes (one
    backward on loss-balancer steps, no Gramian)."""
    from dist_mtl.balancers import build_balancer

    out = distributed_runs(2)
    failures = []
    for name, overrides in sketch_cases().items():
        ckpt = load(out / name / "checkpoints" / "last.pt")
        failures += [
            f"{name}: non-finite {k}" for k, v in ckpt["model"].items() if not torch.isfinite(v).all()
        ]
        fresh = build_balancer(name.removeprefix("sketch-1x2-")).state_dict()
        if fresh and ckpt["balancer"] == fresh:
            failures.append(f"{name}: the balancer state did not move")
        failures += [f"{name}: {e}" for e in accounted_bytes_errors(out / name, overrides, 2)]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3, 4])
def test_engine_options_off_and_bf16_wire(world_size, distributed_runs, reference) -> None:
    """overlap off and shard_optimizer off equal one process like the defaults; the bfloat16 wire on
    1x3 and 2x2 (the other replica skips the all-to-all) stays within WIRE_TOLERANCE of it."""
    cases = ENGINE_OPTION_CASES[world_size]
    exact = {n: o for n, o in cases.items() if not n.startswith("wire")}
    check_cases(distributed_runs(world_size), exact, reference, world_size)
    out, failures = distributed_runs(world_size), []
    for name, overrides in cases.items():
        if name.startswith("wire"):
            got = load(out / name / "checkpoints" / "last.pt")
            diffs = compare(got, reference(overrides), **WIRE_TOLERANCE)
            diffs += accounted_bytes_errors(out / name, overrides, world_size)
            failures += [f"{name}: {d}" for d in diffs[:5]]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
def test_configured_uneven_split_equals_reference(distributed_runs, reference) -> None:
    cases = {
        f"split-{p}": [*layout_overrides(1, 2), *SPLIT, "balancer.name=mgda", f"engine.protocol={p}"]
        for p in LOSSLESS
    }
    check_cases(distributed_runs(2), cases, reference, 2)


@pytest.mark.timeout(300)
def test_single_backward_path_and_levers_equal_single_process(distributed_runs, reference) -> None:
    """Loss balancers, update_every and task_sample on 1x2, 2x1 (gather, gramian) and 2-rank rep: the
    checkpoint (parameters, heads' optimizer state, balancer state with the levers' state) equals one
    process; the accounted bytes equal the one-backward model on every step that did not solve a
    Gramian (so none moved) and every rank ran one encoder backward on those steps."""
    check_cases(distributed_runs(2), SINGLE_BACKWARD_CASES, reference, 2)
    kept = load(distributed_runs(2) / "every3-1x2-mgda-gramian" / "checkpoints" / "last.pt")["balancer"]
    assert kept["age"] == 1 and len(kept["coefficients"]) == 5  # step 4 solved: a fresh period


@pytest.mark.timeout(300)
def test_update_every_resumed_mid_period_equals_uninterrupted(distributed_runs, reference) -> None:
    out = distributed_runs(2) / "every3-resume"
    ckpt = load(out / "checkpoints" / "last.pt")
    middle = load(out / "checkpoints" / "step_00000002.pt")
    assert middle["balancer"]["age"] == 2  # checkpointed between two updates
    state = ("model", "optimizer", "balancer", "step")
    expected = reference([o for o in EVERY_RESUME if not o.startswith("train.checkpoint_every")])
    diffs = compare({k: ckpt[k] for k in state}, {k: expected[k] for k in state})
    assert not diffs, diffs


@pytest.mark.timeout(300)
def test_missing_labels_equal_single_process(distributed_runs, reference) -> None:
    """Label -1 on 90% of (sample, task) pairs: 2 x 2 exact and 4-rank rep runs equal one process."""
    check_cases(distributed_runs(4), MISSING_CASES, reference, 4)
    # The runs did meet batches in which a task had no label (a zero Gramian row, left out).
    events = load(distributed_runs(4) / "missing-2x2-gramian-mgda" / "checkpoints" / "last.pt")["events"]
    assert json.loads(events)["degenerate_zero_gradient_tasks"] > 0


@pytest.mark.timeout(300)
def test_resume_reproduces_the_uninterrupted_run(distributed_runs, reference) -> None:
    """2 steps, checkpoint (heads' optimizer state gathered from their owners), resume for 2 more."""
    out = distributed_runs(4)
    overrides = [*layout_overrides(2, 2), "balancer.name=mgda", "engine.protocol=gramian"]
    ckpt = load(out / "resume" / "checkpoints" / "last.pt")
    assert ckpt["step"] == STEPS
    assert (out / "resume" / "checkpoints" / "step_00000002.pt").is_file()
    # The history differs by design: the first run evaluated at its last step, 2.
    state = ("model", "optimizer", "balancer", "step")
    diffs = compare({k: ckpt[k] for k in state}, {k: reference(overrides)[k] for k in state})
    assert not diffs, diffs


@pytest.mark.timeout(300)
def test_replica_divergence_fails_every_rank_naming_the_ranks(distributed_runs) -> None:
    out = distributed_runs(3) / "divergence"
    messages = [json.loads((out / f"rank{r}.json").read_text())["message"] for r in range(3)]
    for message in messages:
        assert "step 4" in message and "ranks [2] differ from rank 0" in message, message
