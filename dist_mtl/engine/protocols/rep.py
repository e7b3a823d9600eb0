"""Protocol `rep`: MGDA-UB (or any balancer on representation gradients) with pure data parallelism.

Rank w of W takes part w of the global batch and runs every head. Its losses are its labelled sums
divided by the global batch's labelled counts per task (one tiny all-reduce of T counts first), so its
representation gradients, head gradients and losses are its share of the full batch's; one
all-reduce of [head grads | losses | partial Gramian] then holds the full-batch values. The
coordinator solves and broadcasts c, every rank runs one encoder backward of sum_t c_t L_t, and one
all-reduce gives the full-batch shared gradient.

A loss balancer (or a step between updates of balancer.update_every) needs no representation
gradients: LOSSES steps reduce the T losses onto the coordinator, which solves and broadcasts c; then
every rank runs ONE backward of sum_t c_t L_t (heads unweighted), all-reduces [head grads | T losses]
and the shared gradient, and checks [losses | finite flag] on the host (the same on every rank).

With engine.overlap (and more than one rank), the shared gradient is all-reduced in buckets of about
engine.bucket_mb (`dist_mtl.engine.buckets`), each launched from the parameters' post-accumulate-grad
hooks as soon as its gradients are in, so the all-reduce runs under the rest of the encoder backward;
they are waited before the gradient is read (finite check, optimizer). Without it, one all-reduce of
the whole buffer after the backward. Either way the one device-to-host copy per step is the finite
check's (or the coordinator's solve).
"""

from __future__ import annotations

import torch

from dist_mtl.engine.buckets import BucketedAllReduce, bucket_sizes, cap_elements
from dist_mtl.engine.protocols.base import (
    Protocol,
    StepContext,
    coefficients_from_losses,
    loss_solve_bytes,
    solution_bytes,
)
from dist_mtl.engine.traffic import F32, StepShape, all_reduce_bytes, total
from dist_mtl.gradients import FlatGradBuffer, labelled_counts
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import (
    StepResult,
    finite_check,
    representation_backward,
    representation_forward,
    weighted_backward,
)
from dist_mtl.solve import GRAMIAN, Solution, mark_gramian_step, single_backward_solution, step_plan


class RepProtocol(Protocol):
    """One rank of `rep`: every rank runs every head on its slice; everything replicated."""

    name = "rep"
    mode = "rep"

    def __init__(self, ctx: StepContext) -> None:
        model = ctx.model
        self.model, self.coordinator, self.optimizer = model, ctx.coordinator, ctx.optimizer
        self.comm, self.world = ctx.comm, ctx.groups.world
        self.checksum, self.fault = ctx.checksum, ctx.fault
        self.shared = model.shared_parameters()
        self.heads = [p for t in range(model.num_tasks) for p in model.head_parameters(t)]
        t = model.num_tasks
        heads = sum(p.numel() for p in self.heads)
        device = self.shared[0].device
        # [head grads | losses | partial Gramian]: one all-reduce.
        self.flat = torch.zeros(heads + t + t * t, device=device)
        self.head_grad = FlatGradBuffer(self.heads, out=self.flat[:heads])
        self.losses = self.flat[heads : heads + t]
        self.gramian = self.flat[heads + t :].view(t, t)
        self.heads_and_losses = self.flat[: heads + t]  # what the single-backward path all-reduces
        self.shared_grad = FlatGradBuffer(self.shared)
        self.buckets: BucketedAllReduce | None = None  # None: one all-reduce after the backward
        engine = ctx.cfg.engine
        if engine.overlap and self.world.size > 1:
            buffer = self.shared_grad.buffer
            self.buckets = BucketedAllReduce(
                self.shared,
                buffer,
                cap_elements(int(engine.bucket_mb * 2**20), buffer.element_size()),
                lambda view: self.comm.start_all_reduce(view, self.world),
            )
        self.loss_buffer = torch.zeros(t, device=device)  # LOSSES: reduced onto the coordinator

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        balancer = self.coordinator.balancer
        kind, kept = step_plan(balancer)
        with self.comm.stepping(rec, self.fault) as step:
            counts = labelled_counts(y)
            with rec.phase("exchange"):
                self.comm.all_reduce(counts, self.world)
            if kind == GRAMIAN:
                solution = self._balanced(x, y, counts, rec)
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
        with rec.phase("forward"):
            z, z_leaf, parts = representation_forward(self.model, x, y, range(self.model.num_tasks), counts)
            losses = torch.stack(parts).detach()
        self.loss_buffer.copy_(losses)
        solved, c = coefficients_from_losses(
            self.comm, self.coordinator, self.loss_buffer, self.world, kind, kept, rec
        )
        if solved is not None and solved.skipped:
            return solved
        coefficients = c if solved is None else solved.coefficients
        with rec.phase("backward"):
            self._arm()
            weighted_backward(z, z_leaf, parts, c.to(losses.device), self.shared_grad, self.head_grad)
        self.losses.copy_(losses)
        with rec.phase("exchange"):
            self._finish()  # launches what is left of the shared gradient first, then waits it
            self.comm.all_reduce(self.heads_and_losses, self.world)
        with rec.phase("apply"):
            checked = finite_check(self.losses, self.shared_grad.buffer)
        return single_backward_solution(kind, coefficients, checked, solved)

    def _balanced(
        self, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, rec: StepRecorder
    ) -> Solution:
        """The Gramian path: representation gradients, their Gramian, solve, one encoder backward."""
        tasks = range(self.model.num_tasks)
        with rec.phase("forward"):
            z, z_leaf, losses = representation_forward(self.model, x, y, tasks, counts)
        with rec.phase("backward"):
            rep_grads, losses = representation_backward(losses, z_leaf, self.head_grad)
        with rec.phase("solve"):
            torch.mm(rep_grads, rep_grads.T, out=self.gramian)
            self.losses.copy_(losses)
        with rec.phase("exchange"):
            self.comm.all_reduce(self.flat, self.world)
        solution, c = self.coordinator.solve(self.gramian, self.losses, rec)
        if not solution.skipped:
            with rec.phase("apply"):
                z_grad = (c.to(rep_grads.dtype) @ rep_grads).view_as(z)
                self.shared_grad.buffer.zero_()
                self._arm()
                z.backward(z_grad, inputs=self.shared)
                with rec.phase("exchange"):
                    self._finish()
        return mark_gramian_step(solution, 1)

    def _arm(self) -> None:
        """Before the encoder backward: with overlap, its buckets launch as their gradients come in."""
        if self.buckets is not None:
            self.buckets.arm()

    def _finish(self) -> None:
        """After it: the full-batch shared gradient is in the buffer when this returns."""
        if self.buckets is not None:
            self.buckets.finish()
        else:
            self.comm.all_reduce(self.shared_grad.buffer, self.world)

    @staticmethod
    def shared_grad_bytes(shape: StepShape) -> tuple[int, int]:
        """The shared gradient's all-reduce: one of P, or (overlap) one per bucket, whose sizes follow
        from `shape.shared_sizes` and bucket_bytes; per bucket because the ring's integer division
        makes the sum differ from one of P."""
        world = shape.replicas * shape.k
        if not shape.overlap or world == 1:
            return all_reduce_bytes(F32 * shape.params, world)
        sizes = shape.shared_sizes or (shape.params,)
        if sum(sizes) != shape.params:
            raise ValueError(f"StepShape.shared_sizes sum to {sum(sizes)}, not params={shape.params}")
        buckets = bucket_sizes(sizes, cap_elements(shape.bucket_bytes, F32))
        return total(*(all_reduce_bytes(F32 * n, world) for n in buckets))

    @classmethod
    def single_backward_bytes(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """All-reduce of T counts; LOSSES: reduce of T losses and the broadcast of c; all-reduce of
        P (`shared_grad_bytes`) and of [head grads | T losses]."""
        t, world = shape.tasks, shape.replicas * shape.k
        return total(
            all_reduce_bytes(F32 * t, world),
            loss_solve_bytes(shape, rank),
            all_reduce_bytes(F32 * (shape.all_head_params + t), world),
            cls.shared_grad_bytes(shape),
        )

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """All-reduce of T counts, of [head grads | T losses | T x T], the broadcast of c, all-reduce of P
        (`shared_grad_bytes`)."""
        t, world = shape.tasks, shape.replicas * shape.k
        return total(
            all_reduce_bytes(F32 * t, world),
            all_reduce_bytes(F32 * (shape.all_head_params + t + t * t), world),
            solution_bytes(shape, rank),
            cls.shared_grad_bytes(shape),
        )
