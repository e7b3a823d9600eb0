"""One rank of a distributed run (under torchrun, or any launcher that sets RANK / WORLD_SIZE / MASTER_*).

Order matters: every check that can reject the run (layout, protocol, compression, batch size) runs
before the process group exists, so a bad config fails fast with the field's name instead of as a
collective error on some other rank. Then gloo (CPU) or NCCL (CUDA) with engine.timeout_s, a
("replica", "task") DeviceMesh whose sub-groups get the same timeout, the trainer, and always
destroy_process_group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dist_mtl.config import ConfigError, RunConfig
from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError
from dist_mtl.engine.layout import Layout, check_engine_config, resolve_layout
from dist_mtl.engine.runtime import Engine
from dist_mtl.trainer import build_datasets, format_summary, resolve_device, train

MESH_DIMS = ("replica", "task")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _options(backend: str, timeout: timedelta) -> object:
    """Backend options carrying the timeout: DeviceMesh sub-groups do not inherit the world's."""
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


def device_mesh(layout: Layout, device: torch.device, timeout_s: float) -> DeviceMesh:
    """The ("replica", "task") mesh of `layout` on the initialised default group, with the timeout."""
    backend = backend_for(device)
    options = {name: (backend, _options(backend, timedelta(seconds=timeout_s))) for name in MESH_DIMS}
    return init_device_mesh(
        device.type,
        (layout.replicas, layout.task_parallel),
        mesh_dim_names=MESH_DIMS,
        backend_override=options,
    )


@contextmanager
def process_group(layout: Layout, device: torch.device, timeout_s: float) -> Iterator[DeviceMesh]:
    """The default group and the mesh for `layout`; the group is always destroyed on exit."""
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend_for(device), timeout=timeout, device_id=device if device.type == "cuda" else None
    )
    try:
        yield device_mesh(layout, device, timeout_s)
    finally:
        dist.destroy_process_group()


def run_distributed(cfg: RunConfig, *, resume: bool = False) -> int:
    """Train as one rank; returns the process exit code (0, 1 for a failed collective, 2 for bad input)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    try:
        device = resolve_device(cfg.train.device)
        check_engine_config(cfg, world_size)
        datasets = build_datasets(cfg)
        layout = resolve_layout(cfg, world_size, len(datasets[0].tasks))
    except (ConfigError, ValueError) as exc:
        print(f"dist_mtl.train: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        with process_group(layout, device, cfg.engine.timeout_s) as mesh:
            engine = Engine(cfg, layout, mesh, device, datasets)
            summary = train(cfg, resume=resume, runtime=engine.runtime())
    except (CollectiveError, ReplicaDivergenceError) as exc:
        print(f"dist_mtl.train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        print(format_summary(summary))
        print(
            f"run directory: {cfg.run_dir}  (layout D x K = {layout.replicas} x {layout.task_parallel}, "
            f"protocol {cfg.engine.protocol})"
        )
    return 0
