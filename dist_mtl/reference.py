"""Single-process training steps: the plain reference the distributed engine must reproduce.

`ExactStep` runs T backward passes into the shared parameters (MGDA Algorithm 2); `RepStep` is
MGDA-UB: head-only backward passes give the representation gradients, then one encoder backward
with the balanced representation gradient. In both, head t is updated with its own gradient.

Both take the single-backward path instead when the step needs no Gramian (`solve.step_plan`): a loss
balancer (FAMO, UW, DWA, RLW: c from the losses, solved before the backward) or a step between two
updates of `balancer.update_every` (the kept c). Then ONE backward of sum_t c_t L_t gives the shared
gradient d = G c, as uniform scaling costs, and heads still get their own unweighted gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_mtl.balancers import Balancer
from dist_mtl.gradients import FlatGradBuffer, flatten_grads, task_loss_list
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from dist_mtl.solve import (
    GRAMIAN,
    LOSSES,
    REUSE,
    Solution,
    mark_gramian_step,
    single_backward_solution,
    solve_on_host,
    step_plan,
)


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


def weighted_backward(
    z: torch.Tensor,
    z_leaf: torch.Tensor,
    losses: list[torch.Tensor],
    coefficients: torch.Tensor,
    shared_grad: FlatGradBuffer,
    head_grad: FlatGradBuffer,
) -> None:
    """ONE encoder backward of sum_t c_t L_t into `shared_grad`, each head's own unweighted gradient
    dL_t/dtheta_t into `head_grad` (MGDA Algorithm 2, as the T-backward steps give the heads).

    The heads see the detached leaf `z_leaf` (`representation_forward`), so the two head passes (the
    unweighted one for the heads, the c-weighted one for dZ) never run the encoder; the encoder runs
    once, on dZ = sum_t c_t dL_t/dZ. `coefficients`: (len(losses),) on the losses' device.
    """
    stacked = torch.stack(losses)
    head_grad.buffer.zero_()
    stacked.sum().backward(inputs=head_grad.params, retain_graph=True)
    (z_grad,) = torch.autograd.grad(stacked, z_leaf, grad_outputs=coefficients.to(stacked.dtype))
    shared_grad.buffer.zero_()
    z.backward(z_grad, inputs=shared_grad.params)


def finite_check(losses: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[losses | 1.0 if every gradient entry is finite else 0.0], for one host copy (float64)."""
    flag = torch.isfinite(grad).all().to(losses.dtype).reshape(1)
    return torch.cat([losses.detach().reshape(-1), flag]).to("cpu", torch.float64)


class _SingleProcessStep(ABC):
    """What both reference steps hold: the model, balancer, optimizer and two flat gradient buffers.

    A step asks `step_plan` which path it takes (the subclass's Gramian path, or the single backward),
    and tells the balancer its outcome (`Balancer.follow`) so that `update_every` counts it.
    """

    def __init__(self, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.balancer = balancer
        self.optimizer = optimizer
        self.shared = model.shared_parameters()
        self.heads = [p for t in range(model.num_tasks) for p in model.head_parameters(t)]
        self.shared_grad = FlatGradBuffer(self.shared)
        self.head_grad = FlatGradBuffer(self.heads)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        kind, kept = step_plan(self.balancer)
        if kind == GRAMIAN:
            result = self.gramian_step(x, y, rec)
        else:
            result = self.single_backward_step(x, y, rec, kind, kept)
        self.balancer.follow(result.solution.coefficients, result.solution.skipped)
        return result

    @abstractmethod
    def gramian_step(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        """The step that forms the Gramian: T encoder backward passes (exact) or rep's Z-gradients."""

    def single_backward_step(
        self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder, kind: str, kept: torch.Tensor | None
    ) -> StepResult:
        """One forward, c (solved from the losses, or kept), ONE backward of sum_t c_t L_t, step."""
        with rec.phase("forward"):
            z, z_leaf, parts = representation_forward(self.model, x, y, range(self.model.num_tasks))
        solved = None
        if kind == LOSSES:
            with rec.phase("solve"):
                solved = solve_on_host(self.balancer, None, torch.stack(parts))
            if solved.skipped:
                solved.info.update({"step/gramian": 0.0, "step/encoder_backwards": 0.0})
                return StepResult(solved)
            coefficients = solved.coefficients
        else:
            assert kind == REUSE and kept is not None
            coefficients = kept
        with rec.phase("backward"):
            weighted_backward(z, z_leaf, parts, coefficients.to(z.device), self.shared_grad, self.head_grad)
        with rec.phase("apply"):
            checked = finite_check(torch.stack(parts), self.shared_grad.buffer)
        solution = single_backward_solution(kind, coefficients, checked, solved)
        if not solution.skipped:
            with rec.phase("optimizer"):
                self.optimizer.step()
        return StepResult(solution)


class ExactStep(_SingleProcessStep):
    """T backward passes into the shared parameters; direction d = G c from the balancer."""

    def gramian_step(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
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
            solution = mark_gramian_step(solve_on_host(self.balancer, grads @ grads.T, losses), len(parts))
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

    def gramian_step(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        with rec.phase("forward"):
            z, z_leaf, losses = representation_forward(self.model, x, y, range(self.model.num_tasks))
        with rec.phase("backward"):
            rep_grads, losses = representation_backward(losses, z_leaf, self.head_grad)
        with rec.phase("solve"):
            solution = mark_gramian_step(solve_on_host(self.balancer, rep_grads @ rep_grads.T, losses), 1)
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
