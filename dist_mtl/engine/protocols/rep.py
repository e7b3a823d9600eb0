"""Protocol `rep`: MGDA-UB (or any balancer on representation gradients) with pure data parallelism.

Rank w of W takes part w of the global batch and runs every head. Its losses are its labelled sums
divided by the global batch's labelled counts per task (one tiny all-reduce of T counts first), so its
representation gradients, head gradients and losses are its share of the full batch's; one
all-reduce of [head grads | losses | partial Gramian] then holds the full-batch values. The
coordinator solves and broadcasts c, every rank runs one encoder backward of sum_t c_t L_t, and one
all-reduce gives the full-batch shared gradient.
"""

from __future__ import annotations

import torch

from dist_mtl.engine.protocols.base import Protocol, StepContext, solution_bytes
from dist_mtl.engine.traffic import F32, StepShape, all_reduce_bytes, total
from dist_mtl.gradients import FlatGradBuffer, labelled_counts
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import StepResult, representation_backward, representation_forward


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
        self.shared_grad = FlatGradBuffer(self.shared)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        tasks = range(self.model.num_tasks)
        with self.comm.stepping(rec, self.fault) as step:
            counts = labelled_counts(y)
            with rec.phase("exchange"):
                self.comm.all_reduce(counts, self.world)
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
                    z.backward(z_grad, inputs=self.shared)
                    with rec.phase("exchange"):
                        self.comm.all_reduce(self.shared_grad.buffer, self.world)
                with rec.phase("optimizer"):
                    self.optimizer.step()
            self.checksum(step, rec)
        return StepResult(solution)

    @classmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """All-reduce of T counts, of [head grads | T losses | T x T], the broadcast of c, all-reduce of P."""
        t, world = shape.tasks, shape.replicas * shape.k
        return total(
            all_reduce_bytes(F32 * t, world),
            all_reduce_bytes(F32 * (shape.all_head_params + t + t * t), world),
            solution_bytes(shape, rank),
            all_reduce_bytes(F32 * shape.params, world),
        )
