"""One rank of a distributed test: runs several training cases in one process group, one after another.

`python worker.py SPEC.json` with RANK / WORLD_SIZE / MASTER_* set. SPEC lists cases, each a list of
config overrides (every case writes its own run directory); cases with `resume_at` first train to
that step, then resume to train.steps in a second call. A case of kind `divergence` perturbs one
rank's shared parameters and records what the replica checksum reports; a case of kind `memory`
builds the step as the trainer does and records the rank's tensor memory around two steps (see
`measure_memory`). Meshes are built once per layout and shared by the cases that use it, so one
launch covers many (layout, balancer, protocol).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_mtl.build import build_balancer_for, build_datasets, build_model_for, build_optimizer
from dist_mtl.config import load_config
from dist_mtl.data.memory import batch_indices, part_rows
from dist_mtl.engine.checksum import ReplicaChecksum, ReplicaDivergenceError
from dist_mtl.engine.comm import Comm
from dist_mtl.engine.launch import device_mesh
from dist_mtl.engine.layout import resolve_layout
from dist_mtl.engine.runtime import Engine, mesh_groups
from dist_mtl.gradients import flatten_parameters
from dist_mtl.observe import StepRecorder
from dist_mtl.trainer import train

CPU = torch.device("cpu")


def run_case(case: dict[str, Any], world_size: int, meshes: dict[tuple[int, int], Any]) -> None:
    cfg = load_config(None, case["overrides"])
    datasets = build_datasets(cfg)
    layout = resolve_layout(cfg, world_size, len(datasets[0].tasks))
    key = (layout.replicas, layout.task_parallel)
    if key not in meshes:
        meshes[key] = device_mesh(layout, CPU, cfg.engine.timeout_s)
    mesh = meshes[key]
    if case.get("kind") == "divergence":
        check_divergence(
            cfg.run_dir, build_model_for(cfg, datasets[0]), mesh_groups(mesh, layout, dist.get_rank())
        )
        return
    if case.get("kind") == "memory":
        measure_memory(cfg, Engine(cfg, layout, mesh, CPU), datasets[0])
        return
    if case.get("resume_at"):
        first = load_config(None, [*case["overrides"], f"train.steps={case['resume_at']}"])
        train(first, backend=Engine(first, layout, mesh, CPU), datasets=datasets)
    train(cfg, resume=bool(case.get("resume_at")), backend=Engine(cfg, layout, mesh, CPU), datasets=datasets)


def check_divergence(run_dir: str, model: torch.nn.Module, groups: Any) -> None:
    """Identical parameters pass the checksum; a 1e-7 change on the last rank fails it on every rank."""
    rank = dist.get_rank()
    flat = flatten_parameters(model.shared_parameters())
    check = ReplicaChecksum(flat, Comm(rank, 60.0), groups.world, every=2)
    rec = StepRecorder()
    check(2, rec)
    if rank == groups.world.size - 1:
        flat[0] += 1e-7
    try:
        check(4, rec)
        message = ""
    except ReplicaDivergenceError as exc:
        message = str(exc)
    out = Path(run_dir) / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"message": message}))


def measure_memory(cfg: Any, engine: Engine, train_set: Any, steps: int = 2) -> None:
    """Bytes of tensor memory this rank holds while stepping, from real allocations.

    Everything from building the model to the last step runs under `torch.profiler` with
    `profile_memory=True`, which reports every CPU allocation and free made on this thread (where
    every engine operation runs; gloo's own worker threads are not included). The running sum of
    those events is the memory allocated since the window opened and still live; the largest value
    inside each step, less the model's parameters, is what the engine (buffers built by `make_step`
    plus the step's temporaries) and the step's autograd temporaries cost. Writes rank{R}.json.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    idx = batch_indices(len(train_set), cfg.data.batch_size, cfg.seed, 0)
    idx = idx[part_rows(len(idx), engine.data_part)]  # a step takes this rank's part of the batch
    x, y = train_set.x[idx], train_set.y[idx]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model_for(cfg, train_set)
        optimizer = build_optimizer(cfg, list(model.parameters()))
        with record_function("build"):
            step = engine.make_step(cfg, model, build_balancer_for(cfg), optimizer)
        for _ in range(steps):
            with record_function("step"):
                step(x, y, StepRecorder())
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    steps = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "step"]
    (_, built), *_ = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "build"]
    live, timeline = 0, []
    for at, nbytes in memory:
        live += nbytes
        timeline.append((at, live))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def peak(start: int, end: int) -> int:
        return max((v for t, v in timeline if start <= t <= end), default=0) - model_bytes

    after_build = next((v for t, v in reversed(timeline) if t <= built), 0)
    out = Path(cfg.run_dir) / f"rank{dist.get_rank()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model_bytes": model_bytes,
                "built_bytes": after_build - model_bytes,
                "step_peak_bytes": [peak(start, end) for start, end in steps],
                "shared_params": sum(p.numel() for p in model.shared_parameters()),
                "largest_shared": max(p.numel() for p in model.shared_parameters()),
            }
        )
    )


def serve(run: Callable[[dict[str, Any], int, dict[tuple[int, int], Any]], None]) -> int:
    """A rank's main: every case of the spec (argv[1]; a list, or a dict by name) in sequence through
    `run(case, world_size, meshes)`, in one process group, which ends with a barrier and a clean
    shutdown (a rank leaving early aborts DeepSpeed's ZeRO 3 peers)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    meshes: dict[tuple[int, int], Any] = {}
    cases = spec["cases"]
    try:
        for case in cases.values() if isinstance(cases, dict) else cases:
            run(case, world_size, meshes)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def main() -> int:
    return serve(run_case)


if __name__ == "__main__":
    sys.exit(main())
