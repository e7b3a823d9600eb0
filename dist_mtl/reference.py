"""Single-process training steps: the plain reference the distributed engine must reproduce.

`ExactStep` runs T backward passes into the shared parameters (MGDA Algorithm 2); `RepStep` is
MGDA-UB: head-only backward passes give the representation gradients, then one encoder backward
with the balanced representation gradient. In both, head t is updated with its own gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_mtl.balancers import Balancer
from dist_mtl.gradients import FlatGradBuffer, flatten_grads, task_loss_list
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import Solution, solve_on_host


@dataclass
class StepResult:
    solution: Solution  # coefficients, losses and diagnostics on the host

    @property
    def skipped(self) -> bool:
        return self.solution.skipped


def representation_forward(
    model: MultiTaskModel,
    x: torch.Tensor,
    y: torch.Tensor,
    tasks: Sequence[int],
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(Z, a detached leaf copy of Z, the tasks' losses computed from the leaf): heads see only the leaf.

    `counts`: labelled samples per task in the global batch (default: in this batch).
    """
    z = model.encode(x)
    z_leaf = z.detach().requires_grad_(True)
    return z, z_leaf, task_loss_list(model.head_logits(z_leaf, tasks), y, counts)


def representation_backward(
    losses: list[torch.Tensor], z_leaf: torch.Tensor, head_grad: FlatGradBuffer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows dL_t/dZ (one head-only backward per task) and the losses as one detached tensor.

    Each head's own gradient goes into `head_grad`.
    """
    rows = torch.stack(
        [torch.autograd.grad(loss, z_leaf, retain_graph=True)[0].reshape(-1) for loss in losses]
    )
    stacked = torch.stack(losses)
    head_grad.buffer.zero_()
    stacked.sum().backward(inputs=head_grad.params)
    return rows, stacked.detach()


class _SingleProcessStep:
    """What both reference steps hold: the model, balancer, optimizer and two flat gradient buffers."""

    def __init__(self, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.balancer = balancer
        self.optimizer = optimizer
        self.shared = model.shared_parameters()
        self.heads = [p for t in range(model.num_tasks) for p in model.head_parameters(t)]
        self.shared_grad = FlatGradBuffer(self.shared)
        self.head_grad = FlatGradBuffer(self.heads)


class ExactStep(_SingleProcessStep):
    """T backward passes into the shared parameters; direction d = G c from the balancer."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        tasks = range(self.model.num_tasks)
        with rec.phase("forward"):
            parts = task_loss_list(self.model.head_logits(self.model.encode(x), tasks), y)
        with rec.phase("backward"):
            grads = torch.stack(
                [
                    flatten_grads(
                        torch.autograd.grad(loss, self.shared, retain_graph=True, allow_unused=True),
                        self.shared,
                    )
                    for loss in parts
                ]
            )
            losses = torch.stack(parts)
            self.head_grad.buffer.zero_()
            losses.sum().backward(inputs=self.heads)
        with rec.phase("solve"):
            solution = solve_on_host(self.balancer, grads @ grads.T, losses)
        if solution.skipped:
            return StepResult(solution)
        with rec.phase("apply"):
            self.shared_grad.write(solution.coefficients.to(grads) @ grads)
        with rec.phase("optimizer"):
            self.optimizer.step()
        return StepResult(solution)


def parameter_space_descent(
    z: torch.Tensor, rep_grads: torch.Tensor, shared: list[torch.nn.Parameter], direction: torch.Tensor
) -> dict[str, float]:
    """Whether a rep-mode direction decreases every task to first order in parameter space.

    Seed 001 shows the MGDA-UB bound does not guarantee it. g_t = J^T dL_t/dZ costs one encoder
    backward per task, so this runs only when asked (train.descent_check_every).
    """
    grads = torch.stack(
        [
            flatten_grads(
                torch.autograd.grad(z, shared, row.view_as(z), retain_graph=True, allow_unused=True), shared
            )
            for row in rep_grads
        ]
    )
    cosines = (grads @ direction) / (grads.norm(dim=1) * direction.norm()).clamp_min(1e-30)
    return {
        "direction/param_decreases_all_tasks": float((cosines > 0).all()),
        "direction/param_min_cosine": float(cosines.min()),
    }


class RepStep(_SingleProcessStep):
    """MGDA-UB: balance the gradients w.r.t. the representation Z, then one encoder backward."""

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        optimizer: torch.optim.Optimizer,
        descent_check_every: int = 0,
    ) -> None:
        super().__init__(model, balancer, optimizer)
        self.descent_check_every = descent_check_every
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        with rec.phase("forward"):
            z, z_leaf, losses = representation_forward(self.model, x, y, range(self.model.num_tasks))
        with rec.phase("backward"):
            rep_grads, losses = representation_backward(losses, z_leaf, self.head_grad)
        with rec.phase("solve"):
            solution = solve_on_host(self.balancer, rep_grads @ rep_grads.T, losses)
        if solution.skipped:
            return StepResult(solution)
        with rec.phase("apply"):
            z_grad = (solution.coefficients.to(rep_grads) @ rep_grads).view_as(z)
            self.shared_grad.buffer.zero_()
            self.calls += 1
            check = self.descent_check_every and self.calls % self.descent_check_every == 0
            z.backward(z_grad, inputs=self.shared, retain_graph=bool(check))
        if check:
            solution.info |= parameter_space_descent(z, rep_grads, self.shared, self.shared_grad.buffer)
        with rec.phase("optimizer"):
            self.optimizer.step()
        return StepResult(solution)
