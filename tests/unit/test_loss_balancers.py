"""Loss balancers (famo, uw, dwa, rlw), each against an independent implementation of its update rule
written here, their state round trips, and the one-backward reference step against T backward passes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dist_mtl.balancers import (
    BALANCER_NAMES,
    Balancer,
    BalancerOutput,
    LossBalancer,
    balancer_needs_gramian,
    build_balancer,
)
from dist_mtl.models import build_model
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import ExactStep, RepStep

LOSS_BALANCERS = ("famo", "uw", "dwa", "rlw")


def loss_sequence(steps: int = 6, tasks: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Decreasing, noisy, positive task losses of consecutive steps."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0.5, 3.0, tasks)
    return [start * np.exp(-0.1 * k * rng.uniform(0.2, 2.0, tasks)) for k in range(steps)]


def run(balancer: Balancer, sequence: list[np.ndarray]) -> list[np.ndarray]:
    """Coefficients of each step, each step adopted as the trainer does."""
    out = []
    for losses in sequence:
        result = balancer(None, torch.tensor(losses))
        balancer.adopt(result)
        out.append(result.coefficients.numpy())
    return out


def test_the_loss_balancers_are_registered_and_need_no_gramian() -> None:
    assert set(LOSS_BALANCERS) <= set(BALANCER_NAMES)
    for name in LOSS_BALANCERS:
        balancer = build_balancer(name)
        assert isinstance(balancer, LossBalancer) and not balancer.needs_gramian and balancer.needs_losses
        assert not balancer_needs_gramian(name)
    assert all(balancer_needs_gramian(n) for n in ("uniform", "mgda", "getmtl", "mamg"))


def test_famo_equals_the_official_rule_with_the_paper_s_plain_logit_step() -> None:
    """c is the gradient of the official code's weighted loss w.r.t. the losses (autograd); the logits
    move by autograd's J^T Delta of softmax (the official `update`), then xi -= lr (grad + gamma xi)."""
    lr, gamma, tasks = 0.5, 0.01, 4  # a large step so the logits visibly move in 6 steps
    sequence = loss_sequence(tasks=tasks)
    got = run(build_balancer("famo", famo_lr=lr, famo_gamma=gamma), sequence)
    w = torch.zeros(tasks, dtype=torch.float64)
    previous = None
    for k, losses in enumerate(sequence):
        current = torch.tensor(losses)
        if previous is not None:
            delta = (previous + 1e-8).log() - (current + 1e-8).log()
            wg = w.clone().requires_grad_(True)
            (d,) = torch.autograd.grad(F.softmax(wg, -1), wg, grad_outputs=delta)
            w = w - lr * (d + gamma * w)
        leaf = current.clone().requires_grad_(True)
        z = F.softmax(w, -1)
        D = leaf + 1e-8
        c = (z / D).sum().detach()
        (expected,) = torch.autograd.grad((D.log() * z / c).sum(), leaf)
        np.testing.assert_allclose(got[k], expected.numpy(), rtol=1e-12, atol=1e-15)
        previous = current
    assert np.ptp(F.softmax(w, -1).numpy()) > 1e-3  # the logits did move


def test_uw_equals_torch_adam_on_the_log_variances() -> None:
    """c = exp(-s); s takes torch.optim.Adam steps on sum_t exp(-s_t) L_t + s_t (autograd)."""
    sequence = loss_sequence(steps=8)
    got = run(build_balancer("uw", uw_lr=0.05), sequence)
    s = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for k, losses in enumerate(sequence):
        np.testing.assert_allclose(got[k], torch.exp(-s).detach().numpy(), rtol=1e-12)
        opt.zero_grad()
        (torch.exp(-s) * torch.tensor(losses) + s).sum().backward()
        opt.step()


def test_uw_leaves_an_unlabelled_task_s_log_variance_and_moments_alone() -> None:
    balancer = build_balancer("uw", uw_lr=0.05)
    run(balancer, loss_sequence(steps=2))
    before = balancer.state_dict()
    losses = loss_sequence(steps=3)[2]
    losses[1] = 0.0
    out = balancer(None, torch.tensor(losses))
    balancer.adopt(out)
    after = balancer.state_dict()
    assert out.coefficients[1] == 0.0
    for key in ("s", "m", "v", "steps"):
        assert after[key][1] == before[key][1] and after[key][0] != before[key][0]


def test_dwa_follows_the_paper_s_formula_on_the_last_two_steps() -> None:
    sequence = loss_sequence(steps=5)
    got = run(build_balancer("dwa", temperature=2.0), sequence)
    np.testing.assert_array_equal(got[0], 1.0)
    np.testing.assert_array_equal(got[1], 1.0)
    for k in range(2, 5):
        r = sequence[k - 1] / sequence[k - 2]
        expected = 4 * np.exp(r / 2.0) / np.exp(r / 2.0).sum()
        np.testing.assert_allclose(got[k], expected, rtol=1e-12)


def test_rlw_is_a_softmax_of_a_standard_normal_fixed_by_seed_and_step() -> None:
    sequence = loss_sequence(steps=200, tasks=3)
    a = np.array(run(build_balancer("rlw", seed=7), sequence))
    b = np.array(run(build_balancer("rlw", seed=7), sequence))  # another rank
    c = np.array(run(build_balancer("rlw", seed=8), sequence))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    logits = np.log(a) - np.log(a).mean(axis=1, keepdims=True)  # softmax logits up to a shift
    # x - mean(x) of i.i.d. N(0, 1): variance (T - 1) / T per entry, mean 0
    assert abs(logits.mean()) < 0.1 and abs(logits.var() - 2 / 3) < 0.15
    assert np.ptp(a, axis=0).min() > 0.5  # a fresh draw every step


@pytest.mark.parametrize("name", LOSS_BALANCERS)
def test_state_round_trips_through_a_checkpoint(name: str) -> None:
    """After 3 adopted steps, a balancer restored from torch.save / torch.load(weights_only) continues
    exactly as the original; calls without adopt change nothing."""
    sequence = loss_sequence(steps=6)
    balancer = build_balancer(name)
    run(balancer, sequence[:3])
    buffer = io.BytesIO()
    torch.save({"balancer": balancer.state_dict()}, buffer)
    buffer.seek(0)
    restored = build_balancer(name)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["balancer"])
    first = balancer(None, torch.tensor(sequence[3])).coefficients
    assert torch.equal(first, balancer(None, torch.tensor(sequence[3])).coefficients)  # pure
    np.testing.assert_array_equal(run(restored, sequence[3:]), run(balancer, sequence[3:]))
    with pytest.raises(ValueError, match=name):
        build_balancer(name).load_state_dict({"foreign": 1})


def test_a_loss_balancer_refuses_another_number_of_tasks_and_negative_losses() -> None:
    balancer = build_balancer("famo")
    run(balancer, loss_sequence(steps=2, tasks=4))
    with pytest.raises(ValueError, match="holds state for 4 tasks but got 3 losses"):
        balancer(None, torch.ones(3))
    with pytest.raises(ValueError, match="needs losses >= 0"):
        build_balancer("dwa")(None, torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="needs the task losses"):
        build_balancer("uw")(None, None)


class Fixed(Balancer):
    """A Gramian balancer that returns given coefficients (the T-backward path with a known c)."""

    name = "fixed"

    def __init__(self, c: np.ndarray) -> None:
        self.c = c

    def __call__(self, M, losses=None) -> BalancerOutput:  # also on zero rows: d = G c drops them
        return BalancerOutput(torch.tensor(self.c), {})

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        return self.c, {}


class FixedLosses(LossBalancer):
    """The same coefficients as a loss balancer: the one-backward path."""

    name = "fixed_losses"

    def __init__(self, c: np.ndarray) -> None:
        self.c = c

    def loss_weights(self, losses, active):
        return self.c, {}, None

    def take(self, pending) -> None:
        pass


@pytest.mark.parametrize("step_class", [ExactStep, RepStep])
def test_one_backward_equals_t_backward_passes_with_the_same_coefficients(step_class) -> None:
    """3 Adam steps of the one-backward path (sum_t c_t L_t, heads unweighted) equal ExactStep's T
    backward passes with d = G c, in float32: every parameter and the Adam state within 1e-6."""
    c = np.array([0.5, 0.2, 1.3])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=gen)
    y = torch.randint(0, 3, (3, 16, 3), generator=gen)
    y[1, :, 2] = -1  # one step in which task 2 has no label (loss 0, zero gradient)
    models = []
    for balancer, cls in ((Fixed(c), ExactStep), (FixedLosses(c), step_class)):
        torch.manual_seed(1)
        model = build_model("mlp", (8,), [3, 3, 3], hidden=[16], rep_dim=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        step = cls(model, balancer, optimizer)
        for k in range(3):
            solution = step(x[k], y[k], StepRecorder()).solution
            assert not solution.skipped
            assert solution.info["step/gramian"] == float(isinstance(balancer, Fixed))
            assert solution.info["step/encoder_backwards"] == (3.0 if isinstance(balancer, Fixed) else 1.0)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_one_backward_step_runs_the_encoder_backward_once() -> None:
    """Counted with a hook on the encoder's first layer: one backward for a loss balancer, T for MGDA."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16, 4))
    for name, expected in (("famo", 1), ("mgda", 4)):
        model = build_model("mlp", (8,), [3] * 4, hidden=[16], rep_dim=8)
        calls = []
        first = model.shared_parameters()[0]
        first.register_hook(calls.append)  # returns None: the gradient is left as it is
        step = ExactStep(model, build_balancer(name), torch.optim.SGD(model.parameters(), lr=0.1))
        step(x, y, StepRecorder())
        assert len(calls) == expected, (name, len(calls))


def test_a_non_finite_loss_skips_the_one_backward_step() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (8,), [3, 3], hidden=[16], rep_dim=8)
    before = [p.detach().clone() for p in model.parameters()]
    balancer = build_balancer("famo")
    step = ExactStep(model, balancer, torch.optim.Adam(model.parameters()))
    x = torch.randn(16, 8)
    x[0, 0] = float("nan")
    result = step(x, torch.randint(0, 3, (16, 2)), StepRecorder())
    assert result.skipped and balancer.state_dict() == {"xi": None, "previous": None}
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
