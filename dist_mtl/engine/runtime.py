"""Glue between an initialised process group and the trainer: groups from the DeviceMesh, the step, state.

`Engine.runtime()` returns the `trainer.Runtime` whose hooks the training loop calls; the step and the
state object are created by `make_step`, once the trainer has built the model and optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from dist_mtl.balancers import Balancer
from dist_mtl.config import RunConfig
from dist_mtl.data import MultiTaskDataset
from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.coordinator import Coordinator
from dist_mtl.engine.exact import TaskParallelStep
from dist_mtl.engine.fault import fault_injector
from dist_mtl.engine.layout import Layout
from dist_mtl.engine.protocols import Groups
from dist_mtl.engine.rep import DataParallelRepStep
from dist_mtl.engine.state import HeadShards, ReplicatedState
from dist_mtl.gradients import flatten_parameters
from dist_mtl.models import MultiTaskModel
from dist_mtl.trainer import Runtime, Step


def mesh_groups(mesh: DeviceMesh, layout: Layout, rank: int) -> Groups:
    """The world, task and replica groups of this rank, checked against the layout's numbering."""
    replica, k = layout.coords(rank)
    expected = {"task": layout.task_group(replica), "replica": layout.replica_group(k)}
    groups = {}
    for name, ranks in expected.items():
        pg = mesh.get_group(name)
        found = dist.get_process_group_ranks(pg)
        if found != ranks:
            raise RuntimeError(f"DeviceMesh {name} group of rank {rank} is {found}, layout expects {ranks}")
        groups[name] = Group(name, tuple(ranks), pg if len(ranks) > 1 else None)
    world = Group("world", tuple(range(layout.world_size)), dist.group.WORLD)
    return Groups(world=world, task=groups["task"], replica=groups["replica"])


class Engine:
    def __init__(
        self,
        cfg: RunConfig,
        layout: Layout,
        mesh: DeviceMesh,
        device: torch.device,
        datasets: tuple[MultiTaskDataset, MultiTaskDataset] | None = None,
    ) -> None:
        self.cfg, self.layout, self.device, self.datasets = cfg, layout, device, datasets
        self.rank = dist.get_rank()
        self.comm = Comm(self.rank, cfg.engine.timeout_s)
        self.groups = mesh_groups(mesh, layout, self.rank)
        self.state: ReplicatedState | None = None

    def make_step(
        self, cfg: RunConfig, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer
    ) -> Step:
        world = self.groups.world
        checksum = ReplicaChecksum(
            flatten_parameters(model.shared_parameters()), self.comm, world, cfg.engine.checksum_every
        )
        coordinator = Coordinator(balancer, self.comm, world, model.num_tasks, self.device)
        fault = fault_injector(self.rank, cfg.engine.timeout_s)
        if cfg.engine.protocol == "rep":
            self.state = ReplicatedState(model, optimizer, balancer, self.comm)
            return DataParallelRepStep(model, coordinator, optimizer, self.comm, world, checksum, fault)
        self.state = HeadShards(model, optimizer, balancer, self.comm, self.layout, self.groups)
        return TaskParallelStep(
            cfg, model, coordinator, optimizer, self.layout, self.comm, self.groups, checksum, fault
        )

    def _state(self) -> ReplicatedState:
        if self.state is None:
            raise RuntimeError("the engine's step has not been built yet (Runtime.make_step not called)")
        return self.state

    def runtime(self) -> Runtime:
        return Runtime(
            rank=self.rank,
            world_size=self.layout.world_size,
            device=self.device,
            make_step=self.make_step,
            gather_model=lambda: self._state().gather_model(),
            state_dict=lambda: self._state().state_dict(),
            load_state_dict=lambda ckpt: self._state().load_state_dict(ckpt),
            barrier=lambda: self.comm.barrier(self.groups.world),
            all_reduce=lambda tensor: self.comm.all_reduce(tensor, self.groups.world),
            datasets=self.datasets,
        )
