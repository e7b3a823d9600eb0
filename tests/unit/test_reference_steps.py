"""The single-process reference steps apply exactly d = sum_t c_t grad L_t and own-gradient heads."""

import pytest
import torch

from dist_mtl.balancers import BALANCER_NAMES, build_balancer
from dist_mtl.gradients import task_losses
from dist_mtl.models import build_model
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import ExactStep, RepStep


def _problem(seed: int = 0, t: int = 3):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 4, 4), [3] * t, hidden=(12,), rep_dim=6).double()
    x = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10, t))
    return model, x, y


def _grads_of(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _independent_gramian(ref, x, y, rep: bool) -> torch.Tensor:
    """M = G G^T from one explicit autograd call per task: parameter gradients, or Z-gradients (rep)."""
    if rep:
        zl = ref.encode(x).detach().requires_grad_(True)
        lz = task_losses(ref.head_logits(zl, range(ref.num_tasks)), y)
        rows = [torch.autograd.grad(lz[t], zl, retain_graph=True)[0].reshape(-1) for t in range(len(lz))]
    else:
        losses = task_losses(ref(x), y)
        shared = ref.shared_parameters()
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in range(len(losses))
        ]
    g = torch.stack(rows)
    return g @ g.T


# GetMTL with a large eps is not scale invariant, so a Gramian off by a constant factor changes its c.
OPTIONS = {"getmtl": {"eps": 0.9}}


def _check_update(step_cls, balancer_name: str) -> None:
    model, x, y = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = step_cls(model, build_balancer(balancer_name, **OPTIONS.get(balancer_name, {})), opt)
    result = step(x, y, StepRecorder())
    c = result.solution.coefficients
    assert not result.skipped and abs(float(c.sum())) > 0

    # Independent computation on a copy at the old parameters.
    ref, _, _ = _problem()
    losses = task_losses(ref(x), y)
    shared = ref.shared_parameters()
    # The Gramian the step solved and its c equal an independent Gramian and the balancer applied to it.
    fresh = build_balancer(balancer_name, **OPTIONS.get(balancer_name, {}))
    if fresh.needs_gramian:
        gramian = _independent_gramian(ref, x, y, rep=step_cls is RepStep)
        torch.testing.assert_close(result.solution.gramian, gramian, rtol=1e-10, atol=1e-14)
    else:  # a loss balancer: no Gramian formed, one backward (the same in exact and rep mode)
        assert result.solution.gramian is None and result.solution.info["step/gramian"] == 0.0
        gramian = None
    expected = fresh(gramian, losses.detach()).coefficients
    torch.testing.assert_close(c, expected, rtol=1e-9, atol=1e-12)
    if step_cls is ExactStep:
        shared_grad = torch.autograd.grad((c.to(losses) * losses).sum(), shared, retain_graph=True)
    else:  # MGDA-UB: the balanced representation gradient pushed through the encoder.
        z = ref.encode(x)
        zl = z.detach().requires_grad_(True)
        lz = task_losses(ref.head_logits(zl, range(ref.num_tasks)), y)
        gz = torch.autograd.grad((c.to(lz) * lz).sum(), zl)[0]
        shared_grad = torch.autograd.grad(z, shared, gz)
    n_shared = len(shared)
    for p_new, p_old, g in zip(
        list(model.parameters())[:n_shared], before[:n_shared], shared_grad, strict=True
    ):
        torch.testing.assert_close(p_old - p_new.detach(), g, rtol=1e-10, atol=1e-12)
    # Head t moves by the gradient of its own loss, unweighted.
    for t in range(ref.num_tasks):
        own = torch.autograd.grad(losses[t], ref.head_parameters(t), retain_graph=True)
        new = model.head_parameters(t)
        old = before[n_shared + 2 * t : n_shared + 2 * t + 2]
        for p_new, p_old, g in zip(new, old, own, strict=True):
            torch.testing.assert_close(p_old - p_new.detach(), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("balancer", BALANCER_NAMES)
def test_exact_step_applies_weighted_task_gradients(balancer: str) -> None:
    _check_update(ExactStep, balancer)


@pytest.mark.parametrize("balancer", BALANCER_NAMES)
def test_rep_step_applies_balanced_representation_gradient(balancer: str) -> None:
    _check_update(RepStep, balancer)


def test_getmtl_option_used_here_is_not_scale_invariant() -> None:
    """The check above catches a Gramian off by a factor only if some balancer's c depends on the scale."""
    model, x, y = _problem()
    m = _independent_gramian(model, x, y, rep=True)
    getmtl = build_balancer("getmtl", **OPTIONS["getmtl"])
    assert not torch.allclose(getmtl(m).coefficients, getmtl(4 * m).coefficients, rtol=1e-3)


def test_non_finite_batch_is_skipped_and_leaves_parameters() -> None:
    model, x, y = _problem()
    x[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    for step_cls in (ExactStep, RepStep):
        step = step_cls(model, build_balancer("mgda"), torch.optim.Adam(model.parameters()))
        assert step(x, y, StepRecorder()).skipped
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)


def test_rep_descent_check_matches_explicit_parameter_gradients() -> None:
    model, x, y = _problem(seed=3, t=4)
    shared = model.shared_parameters()
    losses = task_losses(model(x), y)
    explicit = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in range(4)
        ]
    )
    step = RepStep(
        model, build_balancer("mgda"), torch.optim.SGD(model.parameters(), lr=0.0), descent_check_every=1
    )
    info = step(x, y, StepRecorder()).solution.info
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    cos = (explicit @ d) / (explicit.norm(dim=1) * d.norm())
    assert abs(info["direction/param_min_cosine"] - float(cos.min())) < 1e-9
    assert info["direction/param_decreases_all_tasks"] == float(bool((cos > 0).all()))
