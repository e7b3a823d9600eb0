"""The task-parallel exact step (protocols gather, gramian, sketch) on one rank of a D x K layout.

Forward the encoder once on the replica's slice of the global batch, back-propagate each owned task
into the shared parameters (T/K backward passes), average over the replica group when D > 1 (one
all-reduce of owned gradients, head gradients and losses together), run the protocol's exchange,
and step the optimizer. Heads of other ranks' tasks keep `.grad = None`, so the optimizer neither
updates them nor allocates state for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dist_mtl.config import RunConfig
from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.codecs import build_codec
from dist_mtl.engine.comm import Comm
from dist_mtl.engine.coordinator import Coordinator
from dist_mtl.engine.layout import Layout
from dist_mtl.engine.protocols import GatherExchange, GramianExchange, Groups, TaskBlock
from dist_mtl.gradients import FlatGradBuffer, task_loss_list
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import StepResult
from dist_mtl.solve import Solution


class TaskParallelStep:
    """The trainer's `Step` on one rank of an exact protocol; owns the rank's flat buffers."""

    def __init__(
        self,
        cfg: RunConfig,
        model: MultiTaskModel,
        coordinator: Coordinator,
        optimizer: torch.optim.Optimizer,
        layout: Layout,
        comm: Comm,
        groups: Groups,
        checksum: ReplicaChecksum,
        fault: Callable[[int], None] | None,
    ) -> None:
        self.model, self.optimizer, self.comm, self.groups = model, optimizer, comm, groups
        self.checksum, self.fault = checksum, fault
        self.replicas = layout.replicas
        self.replica, k = layout.coords(comm.rank)
        self.owned = layout.tasks_of(k)
        self.mine = len(self.owned)
        self.shared = model.shared_parameters()
        self.owned_heads = [p for t in self.owned for p in model.head_parameters(t)]
        params = sum(p.numel() for p in self.shared)
        protocol = cfg.engine.protocol
        exchange_type = GramianExchange if protocol == "gramian" else GatherExchange
        shape = exchange_type.block_shape(layout, k, params)
        # Elements per task gradient: P, or P padded to K equal shards for gramian.
        width = math.prod(shape) // shape[1] if exchange_type is GramianExchange else params
        device = self.shared[0].device
        heads = sum(p.numel() for p in self.owned_heads)
        t_max = layout.max_tasks
        # [owned head grads | owned losses (T_max) | task gradients]: the replica average is one
        # all-reduce over the prefix that holds real data.
        flat = torch.zeros(heads + t_max + math.prod(shape), device=device)
        self.head_grad = FlatGradBuffer(self.owned_heads, out=flat[:heads])
        self.replica_part = flat[: heads + t_max + self.mine * width]
        direction = torch.zeros(width, device=device)
        self.shared_grad = FlatGradBuffer(self.shared, out=direction)
        grads = flat[heads + t_max :].view(shape)
        slots, source = exchange_type.views(grads, direction)
        self.block = TaskBlock(
            losses=flat[heads : heads + t_max],
            grads=grads,
            payload=flat[heads:],
            direction=direction,
            slots=slots,
            source=source,
        )
        if exchange_type is GramianExchange:
            self.exchange: Callable[[StepRecorder], Solution] = GramianExchange(
                layout, comm.rank, comm, groups, coordinator, self.block, params
            )
        else:
            e = cfg.engine
            codec = build_codec(
                "countsketch" if protocol == "sketch" else e.compression,
                params=params,
                topk_ratio=e.topk_ratio,
                sketch_size=e.sketch_size,
                sketch_seed=e.sketch_seed,
                device=device,
            )
            self.exchange = GatherExchange(
                layout, comm.rank, comm, groups, coordinator, self.block, params, codec
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        n = x.shape[0] // self.replicas
        rows = slice(self.replica * n, (self.replica + 1) * n)
        with self.comm.stepping(rec, self.fault) as step:
            self._backward(x[rows], y[rows, self.owned.start : self.owned.stop], rec)
            if self.replicas > 1:
                with rec.phase("exchange"):
                    self.comm.all_reduce(self.replica_part, self.groups.replica)
                    self.replica_part.div_(self.replicas)
            solution = self.exchange(rec)
            if not solution.skipped:
                with rec.phase("optimizer"):
                    self.optimizer.step()
            self.checksum(step, rec)
        return StepResult(solution)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> None:
        """One forward, then one backward per owned task, each task's gradient copied into its slot."""
        with rec.phase("forward"):
            parts = task_loss_list(self.model.head_logits(self.model.encode(x), self.owned), y)
        with rec.phase("backward"):
            for i, loss in enumerate(parts):  # the T/K backward passes are the step's work
                self.shared_grad.buffer.zero_()
                loss.backward(retain_graph=True, inputs=self.shared)
                self.block.slots[i].copy_(self.block.source)
            losses = torch.stack(parts)
            self.head_grad.buffer.zero_()
            losses.sum().backward(inputs=self.owned_heads)
            self.block.losses[: self.mine].copy_(losses.detach())
