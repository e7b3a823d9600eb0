"""Process groups for a layout: gloo (CPU) or NCCL (CUDA) with engine.timeout_s, and a ("replica", "task")
DeviceMesh whose sub-groups get the same timeout; the default group is always destroyed on exit.

The entry point (`dist_mtl.train`) runs every check that can reject the run before calling this, so a
bad config fails fast with the field's name instead of as a collective error on some other rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dist_mtl.engine.layout import Layout

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
