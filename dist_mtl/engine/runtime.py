"""The engine as a `dist_mtl.backend.Backend`: groups from the layout's mesh, the step, state hooks.

The training loop calls these hooks and never sees a process group; the step and the state object
are created by `make_step`, once the trainer has built the model and optimizer. The engine never
imports the trainer. With `gramian` and engine.shard_optimizer the protocol steps a `ShardedOptimizer`
(ZeRO-1: each rank steps 1/W of the shared parameters) in place of the trainer's optimizer, whose
hyperparameters it follows and whose `state` holds this rank's part.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist

from dist_mtl.backend import Step
from dist_mtl.balancers import Balancer
from dist_mtl.config import RunConfig
from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.compat import LayoutGroups
from dist_mtl.engine.coordinator import Coordinator
from dist_mtl.engine.fault import fault_injector
from dist_mtl.engine.layout import Layout
from dist_mtl.engine.protocols import Groups, StepContext, build_protocol, protocol_class
from dist_mtl.engine.shard_optimizer import ShardedOptimizer, flatten_padded, shard_numel
from dist_mtl.engine.state import HeadShards, ReplicatedState, ShardedState
from dist_mtl.engine.stop_vote import StopVote
from dist_mtl.engine.sync_norm import attach_norm_sync
from dist_mtl.gradients import flatten_parameters
from dist_mtl.models import MultiTaskModel


def mesh_groups(mesh: LayoutGroups, layout: Layout, rank: int) -> Groups:
    """The world, task and replica groups of this rank, checked against the layout's numbering."""
    replica, k = layout.coords(rank)
    expected = {"task": layout.task_group(replica), "replica": layout.replica_group(k)}
    groups = {}
    for name, ranks in expected.items():
        pg = mesh.get_group(name)
        found = dist.get_process_group_ranks(pg)
        if found != ranks:
            raise RuntimeError(f"mesh {name} group of rank {rank} is {found}, layout expects {ranks}")
        groups[name] = Group(name, tuple(ranks), pg if len(ranks) > 1 else None)
    world = Group("world", tuple(range(layout.world_size)), dist.group.WORLD)
    return Groups(world=world, task=groups["task"], replica=groups["replica"])


class Engine:
    """One rank of a D x K layout; implements `dist_mtl.backend.Backend`."""

    def __init__(self, cfg: RunConfig, layout: Layout, mesh: LayoutGroups, device: torch.device) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.rank = dist.get_rank()
        self.world_size = layout.world_size
        self.comm = Comm(self.rank, cfg.engine.timeout_s)
        self.groups = mesh_groups(mesh, layout, self.rank)
        self.state: ReplicatedState | None = None
        self.stop_vote = StopVote(cfg.engine.timeout_s)
        if protocol_class(cfg.engine.protocol).mode == "rep":  # pure data parallelism over the world
            self.data_part = (self.groups.world.index(self.rank), self.world_size)
        else:  # the K ranks of a task group share replica r's part
            self.data_part = (layout.coords(self.rank)[0], layout.replicas)

    def make_step(
        self, cfg: RunConfig, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer
    ) -> Step:
        world = self.groups.world
        shared = model.shared_parameters()
        # gramian with engine.shard_optimizer: the shared parameters are views of one (K S) tensor, so
        # the ranks' updated slices are all-gathered straight into them
        sharded = cfg.engine.shard_optimizer and cfg.engine.protocol == "gramian"
        if sharded:
            params = sum(p.numel() for p in shared)
            k_size, replicas = self.layout.task_parallel, self.layout.replicas
            chunks = cfg.engine.overlap_chunks if cfg.engine.overlap else 1  # the protocol's S
            flat = flatten_padded(shared, k_size * shard_numel(params, k_size, replicas, True, chunks))
            watched = flat[:params]
        else:
            flat = watched = flatten_parameters(shared)
        checksum = ReplicaChecksum(watched, self.comm, world, cfg.engine.checksum_every)
        if sharded:  # heads with their owners, the shared parameters' state sliced over the world
            owned = self.layout.tasks_of(self.layout.coords(self.rank)[1])
            heads = [p for t in owned for p in model.head_parameters(t)]
            stepped = ShardedOptimizer(optimizer, shared, flat, heads, self.layout, self.comm, self.groups)
            self.state = ShardedState(
                model, optimizer, balancer, self.comm, self.layout, self.groups, stepped
            )
            return self.build_protocol(cfg, model, balancer, stepped, checksum)
        self.state = self.plain_state(cfg, model, optimizer, balancer)
        return self.build_protocol(cfg, model, balancer, optimizer, checksum)

    def plain_state(
        self, cfg: RunConfig, model: MultiTaskModel, optimizer: torch.optim.Optimizer, balancer: Balancer
    ) -> ReplicatedState:
        """The state hooks without the sharded optimizer: everything on every rank (rep), or heads and
        their optimizer state with their owners (exact protocols)."""
        if protocol_class(cfg.engine.protocol).mode == "rep":
            return ReplicatedState(model, optimizer, balancer, self.comm)
        return HeadShards(model, optimizer, balancer, self.comm, self.layout, self.groups)

    def build_protocol(
        self,
        cfg: RunConfig,
        model: MultiTaskModel,
        balancer: Balancer,
        stepped: object,
        checksum: ReplicaChecksum,
    ) -> Step:
        """This rank's protocol, which applies its direction with `stepped`: the trainer's optimizer,
        the sharded one, or another backend's (anything with the optimizer's `step`)."""
        attach_norm_sync(model, cfg.engine.protocol, self.groups, self.comm, checksum)
        coordinator = Coordinator(balancer, self.comm, self.groups.world, model.num_tasks, self.device)
        fault = fault_injector(self.rank, cfg.engine.timeout_s)
        ctx = StepContext(
            cfg,
            model,
            cast(torch.optim.Optimizer, stepped),
            coordinator,
            self.layout,
            self.comm,
            self.groups,
            checksum,
            fault,
        )
        return build_protocol(cfg.engine.protocol, ctx)

    def _state(self) -> ReplicatedState:
        if self.state is None:
            raise RuntimeError("the engine's step has not been built yet (make_step not called)")
        return self.state

    def gather_model(self) -> None:
        self._state().gather_model()

    def state_dict(self) -> dict[str, Any]:
        return self._state().state_dict()

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self._state().load_state_dict(ckpt)

    def barrier(self) -> None:
        self.comm.barrier(self.groups.world)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.comm.all_reduce(tensor, self.groups.world)
