"""Process groups for a layout: gloo (CPU) or NCCL (CUDA) with engine.timeout_s, and the ("replica",
"task") groups (a DeviceMesh where torch can give its sub-groups the timeout; see `compat`) with the
same timeout; the default group is always destroyed on exit.

The entry point (`dist_mtl.train`) runs every check that can reject the run before calling this, so a
bad config fails fast with the field's name instead of as a collective error on some other rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_mtl.engine.compat import LayoutGroups, layout_groups
from dist_mtl.engine.layout import Layout


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def device_mesh(layout: Layout, device: torch.device, timeout_s: float) -> LayoutGroups:
    """The ("replica", "task") groups of `layout` on the initialised default group, with the timeout."""
    shape = (layout.replicas, layout.task_parallel)
    return layout_groups(shape, device.type, backend_for(device), timedelta(seconds=timeout_s))


@contextmanager
def process_group(layout: Layout, device: torch.device, timeout_s: float) -> Iterator[LayoutGroups]:
    """The default group and the mesh for `layout`; the group is always destroyed on exit."""
    timeout = timedelta(seconds=timeout_s)
    # device_id (eager NCCL init) only where it matters, so the CPU path needs no newer keyword.
    cuda = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), timeout=timeout, **cuda)
    try:
        yield device_mesh(layout, device, timeout_s)
    finally:
        dist.destroy_process_group()
