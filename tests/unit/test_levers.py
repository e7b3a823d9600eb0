"""The levers balancer.update_every (Periodic) and balancer.task_sample (TaskSample): which steps solve,
what the sampled and non-sampled tasks get, purity, identical draws on every rank, state round trips,
and the config checks that name the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_mtl.balancers import Periodic, TaskSample, build_balancer, with_levers
from dist_mtl.balancers.levers import sample_tasks
from dist_mtl.build import build_balancer_for
from dist_mtl.config import ConfigError, load_config
from dist_mtl.solve import GRAMIAN, LOSSES, REUSE, solve_on_host, step_plan


def gramian(t: int = 8, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed).standard_normal((t, 12))
    g[: t // 2] *= -0.5  # some conflict
    return torch.tensor(g @ g.T)


def test_update_every_solves_every_n_adopted_steps_on_every_rank() -> None:
    """Two copies (the coordinator solving, another rank following the broadcast) take the same path:
    solve, reuse, reuse, solve, ...; a skipped step counts for nothing."""
    coordinator = Periodic(build_balancer("mamg", seed=1), every=3)
    other = Periodic(build_balancer("mamg", seed=1), every=3)
    kinds, kept = [], None
    for step in range(7):
        kind, c = step_plan(coordinator)
        assert step_plan(other)[0] == kind
        kinds.append(kind)
        skipped = step == 4
        if kind == GRAMIAN:
            solution = solve_on_host(coordinator, gramian(seed=step), torch.ones(8))
            c, kept = solution.coefficients, solution.coefficients
        else:
            assert torch.equal(c, kept)
        for b in (coordinator, other):
            b.follow(c, skipped)
    assert kinds == [GRAMIAN, REUSE, REUSE, GRAMIAN, REUSE, REUSE, REUSE]
    # the inner balancer moved once per solve (MAMG's step counts adopted solves), on the coordinator
    assert coordinator.inner.step == 2 and other.inner.step == 0
    assert coordinator.state_dict()["age"] == other.state_dict()["age"] == 3


def test_update_every_with_a_loss_balancer_plans_losses_then_reuse() -> None:
    b = Periodic(build_balancer("famo"), every=2)
    assert step_plan(b)[0] == LOSSES and not b.needs_gramian
    b.follow(torch.tensor([0.5, 0.5]), False)
    assert step_plan(b)[0] == REUSE


def test_update_every_state_round_trip_resumes_mid_period() -> None:
    b = Periodic(build_balancer("mgda"), every=4)
    solution = solve_on_host(b, gramian(), torch.ones(8))
    b.follow(solution.coefficients, False)
    b.follow(solution.coefficients, False)  # a reuse step
    restored = with_levers(build_balancer("mgda"), update_every=4)
    restored.load_state_dict(b.state_dict())
    assert restored.age == 2 and np.array_equal(restored.reuse(), solution.coefficients.numpy())
    with pytest.raises(ValueError, match="update_every must have keys"):
        restored.load_state_dict(build_balancer("mgda").state_dict())


def test_task_sample_balances_a_subset_and_gives_the_others_the_mean() -> None:
    M = gramian(10)
    sampler = TaskSample(build_balancer("mgda"), size=4, seed=5)
    out = sampler(M, torch.ones(10))
    c = out.coefficients.numpy()
    chosen = sample_tasks(10, 4, 5, 0)
    sub = build_balancer("mgda")(M[np.ix_(chosen, chosen)]).coefficients.numpy()
    np.testing.assert_allclose(c[chosen], sub, rtol=1e-12)
    others = np.setdiff1d(np.arange(10), chosen)
    np.testing.assert_allclose(c[others], sub.mean(), rtol=1e-12)
    # pure: the same call again gives the same; the subset moves only on adopt
    assert torch.equal(sampler(M, torch.ones(10)).coefficients, out.coefficients)
    sampler.adopt(out)
    assert sampler.step == 1 and not np.array_equal(sampler.subset(10), chosen)


def test_task_sample_subsets_are_a_pure_function_of_seed_and_step() -> None:
    """What every rank (and a resumed run) draws: the same subset for the same (seed, step), S distinct
    tasks, and over many steps every task is drawn about S/T of the time."""
    draws = [sample_tasks(40, 10, 3, step) for step in range(400)]
    again = [sample_tasks(40, 10, 3, step) for step in range(400)]
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    assert all(len(np.unique(d)) == 10 for d in draws)
    counts = np.bincount(np.concatenate(draws), minlength=40) / 400
    assert abs(counts.mean() - 0.25) < 1e-12 and counts.min() > 0.15 and counts.max() < 0.35
    assert not np.array_equal(sample_tasks(40, 10, 4, 0), draws[0])


def test_task_sample_state_round_trip_and_zero_gradient_tasks() -> None:
    M = gramian(6).numpy()
    M[2, :] = M[:, 2] = 0.0  # task 2 has no label in the batch
    sampler = TaskSample(build_balancer("mamg", seed=2), size=6, seed=1)  # S = T: every task sampled
    out = sampler(M)
    assert out.coefficients[2] == 0.0
    sampler.adopt(out)
    restored = TaskSample(build_balancer("mamg", seed=2), size=6, seed=1)
    restored.load_state_dict(sampler.state_dict())
    assert restored.step == 1 and restored.inner.step == 1
    assert torch.equal(restored(M).coefficients, sampler(M).coefficients)


def test_task_sample_refuses_loss_balancers_and_too_many_tasks() -> None:
    with pytest.raises(ValueError, match="needs a Gramian balancer"):
        TaskSample(build_balancer("famo"), size=2)
    with pytest.raises(ValueError, match="task_sample S=9 exceeds the number of tasks T=8"):
        TaskSample(build_balancer("mgda"), size=9)(gramian(8))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["balancer.update_every=0"], "balancer.update_every must be >= 1 (1 = solve every step); got 0"),
        (["balancer.task_sample=-1"], "balancer.task_sample must be 0 (off) or in [1, T]; got -1"),
        (
            ["data.name=synthetic", "data.num_tasks=5", "balancer.task_sample=6"],
            "balancer.task_sample S=6 exceeds the number of tasks T=5 of data.name 'synthetic'",
        ),
        (["balancer.task_sample=3"], "balancer.task_sample S=3 exceeds the number of tasks T=2"),
        (
            ["balancer.name=famo", "balancer.task_sample=1"],
            "balancer.task_sample applies to Gramian balancers",
        ),
        (["balancer.famo_lr=0"], "balancer.famo_lr must be > 0; got 0.0"),
        (["balancer.famo_gamma=-0.1"], "balancer.famo_gamma must be >= 0; got -0.1"),
        (["balancer.uw_lr=0"], "balancer.uw_lr must be > 0"),
        (["balancer.temperature=-1"], "balancer.temperature must be > 0"),
        (["balancer.name=mgda", "balancer.famo_lr=0.1"], "balancer.famo_lr is not used by balancer 'mgda'"),
        (["balancer.name=famo", "balancer.uw_lr=0.1"], "balancer.uw_lr is not used by balancer 'famo'"),
        (["balancer.name=uw", "balancer.temperature=3"], "balancer.temperature is not used by balancer 'uw'"),
        (["balancer.name=dwa", "balancer.seed=3"], "balancer.seed is not used by balancer 'dwa'"),
    ],
)
def test_config_checks_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_config_builds_the_levers_around_the_balancer() -> None:
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.num_tasks=6",
            "balancer.name=mamg",
            "balancer.seed=4",
            "balancer.update_every=3",
            "balancer.task_sample=2",
        ],
    )
    b = build_balancer_for(cfg)
    assert isinstance(b, Periodic) and b.every == 3
    assert isinstance(b.inner, TaskSample) and b.inner.size == 2 and b.inner.seed == 4
    assert b.inner.inner.seed == 4
    # task_sample reads balancer.seed, so it may be set with a balancer that does not
    cfg = load_config(None, ["balancer.name=mgda", "balancer.task_sample=1", "balancer.seed=3"])
    assert build_balancer_for(cfg).seed == 3
    for name, option, value in (("famo", "famo_lr", 0.5), ("uw", "uw_lr", 0.01), ("dwa", "temperature", 1.5)):
        plain = build_balancer_for(load_config(None, [f"balancer.name={name}", f"balancer.{option}={value}"]))
        assert getattr(plain, option) == value
    assert type(build_balancer_for(load_config())).__name__ == "MGDA"  # levers off: the plain balancer
