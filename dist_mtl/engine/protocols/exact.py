"""The exact-mode step shared by the task-parallel protocols (gather, gramian, sketch).

On one rank of a D x K layout: forward the encoder once on the replica's part of the global batch,
back-propagate each owned task into the shared parameters (T/K backward passes), sum over the
replica group when D > 1 (one all-reduce of owned gradients, head gradients and losses together;
each replica's losses are already divided by the global batch's labelled counts per task, which a
tiny all-reduce of T/K counts gives before the forward, so missing labels weigh correctly),
run the protocol's exchange, and step the optimizer. Heads of other ranks' tasks keep
`.grad = None`, so the optimizer neither updates them nor allocates state for them.

A subclass decides where the owned task gradients live (`make_block`: its buffer layout inside the
rank's one flat buffer, optionally followed by a receive area, `tail_numel`) and how they become d
(`exchange`); this class does the rest.

The single-backward path (`solve.step_plan` LOSSES or REUSE: a loss balancer, or a step between two
updates of balancer.update_every) is the same for every exact protocol and layout: one forward, then
(LOSSES only) the owned losses reduced over the world onto the coordinator, which solves from them and
broadcasts c; ONE backward of sum over the owned tasks of c_t L_t through the owned heads and the
encoder (heads get their own unweighted gradients); the owned heads' gradients all-reduced over the
replica group (D > 1); one all-reduce over the world of [T losses | shared gradient] (summing over the
task group adds the task blocks, summing over replicas adds the batch parts, each already divided by
the global batch's labelled counts: the full-batch d = sum_t c_t g_t, in one bucket); and one host
copy of [losses | finite flag], identical on every rank, which skips a non-finite step everywhere.
No Gramian and no task gradient moves.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from dist_mtl.engine.comm import Pending
from dist_mtl.engine.pipeline import Stage, TaskPipeline
from dist_mtl.engine.protocols.base import Protocol, StepContext, coefficients_from_losses, loss_solve_bytes
from dist_mtl.engine.traffic import F32, StepShape, all_reduce_bytes, total
from dist_mtl.gradients import FlatGradBuffer, labelled_counts, task_loss_list
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import StepResult, finite_check, representation_forward, weighted_backward
from dist_mtl.solve import (
    GRAMIAN,
    Solution,
    mark_gramian_step,
    single_backward_solution,
    step_plan,
)


@dataclass
class TaskBlock:
    """One rank's per-step exchange state: views into its flat buffer, allocated once."""

    losses: torch.Tensor  # (T_max,) owned losses, zero beyond the rank's own tasks
    grads: torch.Tensor  # owned task gradients in the protocol's layout, zero-padded
    filled: int  # leading elements of the block holding real data (the replica all-reduce covers them)
    slots: list[torch.Tensor]  # slots[i]: the view of `grads` that receives owned task i's gradient
    direction: torch.Tensor  # the shared gradient buffer; its first P entries are the .grad views
    source: torch.Tensor  # `direction` seen like a slot: after task i's backward, copied into slots[i]


class TaskParallelProtocol(Protocol):
    """Exact mode on one rank of a D x K layout; subclasses own the block layout and the exchange."""

    mode = "exact"
    overlaps: ClassVar[bool] = False  # implements the per-task exchange of engine.overlap

    def __init__(self, ctx: StepContext) -> None:
        layout, model = ctx.layout, ctx.model
        # engine.overlap: each owned task's exchange starts when its backward ends (`task_stages`),
        # and with D > 1 each task's replica all-reduce too; the block layout may depend on it.
        self.overlapping = ctx.cfg.engine.overlap and self.overlaps
        self.pipeline = TaskPipeline()
        self.rest: Pending | None = None  # overlap, D > 1: the all-reduce of [owned head grads | ...]
        self.rec: StepRecorder | None = None  # the step in progress, for the stages' phases
        self.model, self.optimizer, self.comm, self.groups = model, ctx.optimizer, ctx.comm, ctx.groups
        self.coordinator, self.checksum, self.fault = ctx.coordinator, ctx.checksum, ctx.fault
        self.engine_cfg = ctx.cfg.engine
        self.replicas, self.k_size, self.num_tasks = layout.replicas, layout.task_parallel, layout.num_tasks
        self.replica, self.k = layout.coords(ctx.comm.rank)
        self.owned = layout.tasks_of(self.k)
        self.mine, self.t_max = len(self.owned), layout.max_tasks
        self.split = layout.split
        self.shared = model.shared_parameters()
        self.owned_heads = [p for t in self.owned for p in model.head_parameters(t)]
        self.params = sum(p.numel() for p in self.shared)
        self.device = self.shared[0].device
        heads = sum(p.numel() for p in self.owned_heads)
        # [owned head grads | the protocol's block | its tail]: the replica average is one all-reduce
        # of the prefix that holds real data.
        flat = torch.zeros(heads + self.block_numel() + self.tail_numel(), device=self.device)
        self.head_grad = FlatGradBuffer(self.owned_heads, out=flat[:heads])
        # [T losses | shared gradient buffer]: the single-backward path all-reduces the first T + P
        # elements in one collective; the protocols see only `direction`.
        self.reduced = torch.zeros(self.num_tasks + self.direction_numel(), device=self.device)
        direction = self.reduced[self.num_tasks :]
        self.shared_grad = FlatGradBuffer(self.shared, out=direction)
        self.loss_buffer = torch.zeros(self.num_tasks, device=self.device)  # LOSSES: reduced to rank 0
        self.block = self.make_block(flat[heads:], direction)
        self.replica_part = flat[: heads + self.block.filled]

    @abstractmethod
    def block_numel(self) -> int:
        """Elements of the rank's block (losses and task gradients)."""

    def tail_numel(self) -> int:
        """Elements right after the block, for what the protocol receives next to its own rows."""
        return 0

    def direction_numel(self) -> int:
        """Elements of the shared gradient buffer (P, or more when the layout pads it)."""
        return self.params

    @abstractmethod
    def make_block(self, flat: torch.Tensor, direction: torch.Tensor) -> TaskBlock:
        """Lay the losses and the owned task gradients out in `flat` (`block_numel` elements, then
        `tail_numel` more)."""

    def task_row(self, i: int) -> torch.Tensor:
        """Overlap, D > 1: owned task i's data in the block (contiguous), all-reduced over the replica
        group before its exchange."""
        raise NotImplementedError(f"{type(self).__name__} does not overlap")

    def overlap_rest(self) -> torch.Tensor:
        """Overlap, D > 1: the prefix of the replica part that the task rows do not cover (head
        gradients, losses), all-reduced once after the last backward."""
        raise NotImplementedError(f"{type(self).__name__} does not overlap")

    def task_stages(self, i: int) -> list[Stage]:
        """Overlap: the chain of round i's exchange (every rank runs rounds 0 .. T_max - 1; rounds
        past its own tasks start after its last backward)."""
        raise NotImplementedError(f"{type(self).__name__} does not overlap")

    def finish_overlap(self, rec: StepRecorder) -> None:
        """Wait for every round's chain and the rest of the replica part (exchange phase)."""
        with rec.phase("exchange"):
            self.pipeline.drain()
            if self.rest is not None:
                self.rest.wait()
                self.rest = None

    def begin_task(self, i: int) -> None:
        """Owned task i's backward is about to run (a protocol that sends parts of it while it runs
        arms its gradient hooks here)."""

    def end_task(self, i: int) -> None:
        """Owned task i's backward has ended: its gradient goes into its slot and, with overlap, its
        round starts."""
        self.block.slots[i].copy_(self.block.source)
        if self.overlapping:
            self._start_round(i)

    def start_foreign_rounds(self) -> None:
        """Overlap, after the last backward: the rounds in which only other ranks send."""
        for i in range(self.mine, self.t_max):
            self._start_round(i)

    def _start_round(self, i: int) -> None:
        self.pipeline.start(
            self.replica_stages(self.task_row(i) if i < self.mine else None) + self.task_stages(i)
        )

    def replica_stages(self, row: torch.Tensor | None) -> list[Stage]:
        """D > 1: a round's first stage, the replica all-reduce of `row` (None: a round without data
        of this rank's, a stage that does nothing), so that stage s of every chain is on one group."""
        if self.replicas == 1:
            return []
        if row is None:
            return [lambda: None]
        return [lambda: self.comm.start_all_reduce(row, self.groups.replica)]

    @abstractmethod
    def exchange(self, rec: StepRecorder) -> Solution:
        """Owned gradients and losses in `self.block` -> d in `self.block.direction` (unless skipped)."""

    @staticmethod
    def replica_bytes(shape: StepShape, rank: int, filled: int) -> tuple[int, int]:
        """The D > 1 replica all-reduces: the owned tasks' labelled counts, then [owned head grads |
        `filled` block elements], both float32."""
        if shape.replicas == 1:
            return 0, 0
        k = rank % shape.k
        head = shape.head_params[k] if shape.head_params else 0
        return total(
            all_reduce_bytes(F32 * shape.split[k], shape.replicas),
            all_reduce_bytes(F32 * (head + filled), shape.replicas),
        )

    @classmethod
    def single_backward_bytes(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """D > 1: the replica all-reduces of the owned labelled counts and of the owned heads' gradients;
        LOSSES: the loss reduce and the coordinator's broadcast; always: the world all-reduce of
        [T losses | P]."""
        world, k = shape.replicas * shape.k, rank % shape.k
        head = shape.head_params[k] if shape.head_params else 0
        replica = (
            total(
                all_reduce_bytes(F32 * shape.split[k], shape.replicas),
                all_reduce_bytes(F32 * head, shape.replicas),
            )
            if shape.replicas > 1
            else (0, 0)
        )
        return total(
            replica,
            loss_solve_bytes(shape, rank),
            all_reduce_bytes(F32 * (shape.tasks + shape.params), world),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        """One step on this replica's part (x, y) of the global batch."""
        balancer = self.coordinator.balancer
        kind, kept = step_plan(balancer)
        self.rec = rec
        with self.comm.stepping(rec, self.fault) as step:
            y = y[:, self.owned.start : self.owned.stop]
            counts = labelled_counts(y)
            if self.replicas > 1:
                with rec.phase("exchange"):
                    self.comm.all_reduce(counts, self.groups.replica)
            if kind == GRAMIAN:
                self._backward(x, y, counts, rec)
                if self.replicas > 1 and not self.overlapping:
                    with rec.phase("exchange"):
                        self.comm.all_reduce(self.replica_part, self.groups.replica)
                solution = mark_gramian_step(self.exchange(rec), self.mine)
            else:
                solution = self._single_backward(x, y, counts, rec, kind, kept)
            if not solution.skipped:
                with rec.phase("optimizer"):
                    self.optimizer.step()
            self.checksum(step, rec)
        balancer.follow(solution.coefficients, solution.skipped)
        return StepResult(solution)

    def _single_backward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        rec: StepRecorder,
        kind: str,
        kept: torch.Tensor | None,
    ) -> Solution:
        """The one-backward step (module docstring): c from the losses (LOSSES) or kept (REUSE)."""
        own = slice(self.owned.start, self.owned.stop)
        with rec.phase("forward"):
            z, z_leaf, parts = representation_forward(self.model, x, y, self.owned, counts)
            losses = torch.stack(parts).detach()
        self.loss_buffer.zero_()
        self.loss_buffer[own] = losses
        solved, c = coefficients_from_losses(
            self.comm, self.coordinator, self.loss_buffer, self.groups.world, kind, kept, rec
        )
        if solved is not None and solved.skipped:
            return solved
        coefficients = c if solved is None else solved.coefficients
        with rec.phase("backward"):
            weighted_backward(z, z_leaf, parts, c[own].to(self.device), self.shared_grad, self.head_grad)
        t = self.num_tasks
        reduced_losses = self.reduced[:t]
        reduced_losses.zero_()
        reduced_losses[own] = losses
        with rec.phase("exchange"):
            if self.replicas > 1:
                self.comm.all_reduce(self.head_grad.buffer, self.groups.replica)
            self.comm.all_reduce(self.reduced[: t + self.params], self.groups.world)
        with rec.phase("apply"):
            checked = finite_check(reduced_losses, self.reduced[t : t + self.params])
        return single_backward_solution(kind, coefficients, checked, solved)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, rec: StepRecorder) -> None:
        """One forward, then one backward per owned task, each task's gradient copied into its slot.

        `counts`: the owned tasks' labelled samples in the global batch, which each loss is divided by.
        """
        with rec.phase("forward"):
            parts = task_loss_list(self.model.head_logits(self.model.encode(x), self.owned), y, counts)
            losses = torch.stack(parts)
            # In the block before any backward: an overlapped round may send a task's row with its loss.
            self.block.losses[: self.mine].copy_(losses.detach())
        with rec.phase("backward"):
            for i, loss in enumerate(parts):  # the T/K backward passes are the step's work
                self.shared_grad.buffer.zero_()
                self.begin_task(i)
                loss.backward(retain_graph=True, inputs=self.shared)
                self.end_task(i)
            self.head_grad.buffer.zero_()
            losses.sum().backward(inputs=self.owned_heads)
        if self.overlapping:
            with rec.phase("exchange"):
                self.start_foreign_rounds()
                if self.replicas > 1:
                    self.rest = self.comm.start_all_reduce(self.overlap_rest(), self.groups.replica)
