"""Every torch.distributed call that differs between torch releases, each behind one small function.

The engine supports torch >= 2.4 (pyproject.toml). Newer releases offer better spellings of a few
calls; where they exist they are used, and otherwise a public API that every supported release has
takes over. Nothing else in the engine touches a version-dependent or private torch API.

- `all_gather_into`: `all_gather_single` (torch >= 2.13), else `all_gather_into_tensor`.
- `layout_groups`: the ("replica", "task") groups of a layout with the run's timeout.
  `init_device_mesh(backend_override=...)` (torch >= 2.9) gives a DeviceMesh whose sub-groups carry
  the timeout through backend options (`_timeout`, a private attribute: the only way to give a mesh
  dimension a timeout). Without it, or with DIST_MTL_PUBLIC_GROUPS=1 (to test this path on any
  torch), the same groups come from the public `new_subgroups_by_enumeration(timeout=...)`.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

MESH_DIMS = ("replica", "task")
PUBLIC_GROUPS_ENV = "DIST_MTL_PUBLIC_GROUPS"


class LayoutGroups(Protocol):
    """What the engine needs from a mesh: the process group of a named dimension."""

    def get_group(self, mesh_dim: str) -> dist.ProcessGroup: ...


def all_gather_into(
    out: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
) -> dist.Work | None:
    """`out` receives every rank's `tensor`, in group order, with no intermediate list."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, tensor, group=group, async_op=async_op)


def layout_groups(shape: tuple[int, int], device_type: str, backend: str, timeout: timedelta) -> LayoutGroups:
    """The (replica, task) groups of a D x K layout (rank = r * K + k), every group with `timeout`."""
    if _mesh_takes_backend_options() and os.environ.get(PUBLIC_GROUPS_ENV) != "1":
        options = {name: (backend, _backend_options(backend, timeout)) for name in MESH_DIMS}
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS, backend_override=options)
    return EnumeratedGroups(shape, backend, timeout)


class EnumeratedGroups:
    """The same groups as the DeviceMesh, from `new_subgroups_by_enumeration` (public on every release).

    Every rank creates every group, in the same order, as torch requires.
    """

    def __init__(self, shape: tuple[int, int], backend: str, timeout: timedelta) -> None:
        d, k = shape
        task = [[r * k + j for j in range(k)] for r in range(d)]
        replica = [[r * k + j for r in range(d)] for j in range(k)]
        self._groups = {
            name: dist.new_subgroups_by_enumeration(ranks, timeout=timeout, backend=backend)[0]
            for name, ranks in (("replica", replica), ("task", task))
        }

    def get_group(self, mesh_dim: str) -> dist.ProcessGroup:
        return self._groups[mesh_dim]


def _mesh_takes_backend_options() -> bool:
    return "backend_override" in inspect.signature(init_device_mesh).parameters


def _backend_options(backend: str, timeout: timedelta) -> object:
    """Backend options carrying the timeout: DeviceMesh sub-groups do not inherit the world's."""
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options
