"""Label -1 ("no label for this task"): masked losses, zero gradients, and every balancer's zero row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dist_mtl.balancers import BALANCER_NAMES, build_balancer
from dist_mtl.balancers.rlw import rlw_draw
from dist_mtl.gradients import labelled_counts, task_loss_list, task_losses
from dist_mtl.models import build_model
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import ExactStep, RepStep


def logits_and_targets(
    seed: int = 0, batch: int = 12, tasks: int = 3
) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, 2 + t, generator=gen, requires_grad=True) for t in range(tasks)]
    y = torch.stack([torch.randint(0, 2 + t, (batch,), generator=gen) for t in range(tasks)], dim=1)
    return logits, y


def test_loss_averages_over_labelled_samples_only() -> None:
    logits, y = logits_and_targets()
    y[[0, 3, 7], 0] = -1
    y[:, 2] = -1  # task 2: no label in this batch
    losses = task_loss_list(logits, y)
    keep = y[:, 0] != -1
    expected0 = nn.functional.cross_entropy(logits[0][keep], y[keep, 0])
    torch.testing.assert_close(losses[0], expected0)
    torch.testing.assert_close(losses[1], nn.functional.cross_entropy(logits[1], y[:, 1]))
    assert losses[2].item() == 0.0
    (grad,) = torch.autograd.grad(losses[2], logits[2], allow_unused=True)
    assert grad is None or not grad.any()
    assert labelled_counts(y).tolist() == [9.0, 12.0, 0.0]


def test_parts_with_global_counts_sum_to_the_whole_batch() -> None:
    """Two halves, each divided by the global labelled counts, sum to the whole batch's losses."""
    logits, y = logits_and_targets(seed=1)
    y[:5, 1] = -1  # the first half holds one labelled sample of task 1, the second half six
    whole = task_losses(logits, y)
    counts = labelled_counts(y)
    halves = [task_losses([z[rows] for z in logits], y[rows], counts) for rows in (slice(0, 6), slice(6, 12))]
    torch.testing.assert_close(halves[0] + halves[1], whole)


def gramian_with_zero_row(num_tasks: int = 5, zero: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((num_tasks, 7))
    g[zero] = 0.0
    return g @ g.T


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_every_balancer_leaves_a_zero_gradient_task_out(name: str) -> None:
    """A zero row gets coefficient 0, and the others get what the balancer gives them on their own."""
    M = gramian_with_zero_row()
    losses = np.array([0.7, 0.4, 0.0, 1.1, 0.9])
    out = build_balancer(name)(torch.tensor(M), torch.tensor(losses))
    c = out.coefficients.numpy()
    assert np.isfinite(c).all() and c[2] == 0.0
    assert out.info["degenerate_zero_gradient_tasks"] == 1.0
    keep = [0, 1, 3, 4]
    alone = build_balancer(name)(torch.tensor(M[np.ix_(keep, keep)]), torch.tensor(losses[keep]))
    if name == "rlw":  # a draw per task index: the kept tasks' entries of the same draw, softmax'd
        x = rlw_draw(5, 0, 0)[keep]
        expected = np.exp(x) / np.exp(x).sum()
    else:
        expected = alone.coefficients.numpy()
    np.testing.assert_allclose(c[keep], expected, rtol=1e-12, atol=1e-15)
    # MGDA's direction decreases every task that has a gradient (the zero vector is not in the
    # hull of the others), which keeping the zero row would have made the zero direction.
    if name == "mgda":
        assert (M @ c)[keep].min() > 0


@pytest.mark.parametrize("name", ["famo", "uw", "dwa", "rlw"])
def test_loss_balancers_judge_missing_labels_from_the_losses_alone(name: str) -> None:
    """No Gramian (M = None): a zero loss is the unlabelled task; after a few adopted steps (state that
    has moved) it still gets 0 and the others stay finite and positive."""
    balancer = build_balancer(name)
    rng = np.random.default_rng(0)
    for _ in range(4):
        losses = rng.uniform(0.2, 2.0, 5)
        losses[2] = 0.0
        out = balancer(None, torch.tensor(losses))
        c = out.coefficients.numpy()
        assert c[2] == 0.0 and (np.delete(c, 2) > 0).all() and np.isfinite(c).all()
        assert out.info["degenerate_zero_gradient_tasks"] == 1.0
        balancer.adopt(out)


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_every_balancer_survives_an_all_zero_gramian(name: str) -> None:
    out = build_balancer(name)(torch.zeros(4, 4), torch.zeros(4))
    assert torch.isfinite(out.coefficients).all()


@pytest.mark.parametrize("step_class", [ExactStep, RepStep])
def test_a_step_with_an_unlabelled_task_moves_the_others(step_class) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (8,), [2, 2, 2], hidden=[16], rep_dim=8)
    step = step_class(model, build_balancer("mgda"), torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(16, 8)
    y = torch.randint(0, 2, (16, 3))
    y[:, 1] = -1
    before = [p.detach().clone() for p in model.parameters()]
    solution = step(x, y, StepRecorder()).solution
    assert not solution.skipped and solution.coefficients[1] == 0.0 and solution.losses[1] == 0.0
    assert solution.coefficients[[0, 2]].min() > 0
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert any(moved)
    head = model.head_parameters(1)
    assert all(p.grad is None or not p.grad.any() for p in head)  # no label, no head gradient
