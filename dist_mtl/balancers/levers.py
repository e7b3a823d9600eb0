"""Levers that wrap any balancer: `update_every` (reuse the coefficients between updates) and
`task_sample` (balance a random subset of the tasks). Both keep the wrapped balancer's contract: a
call never changes state, `adopt` moves it, and the state (theirs and the inner balancer's) is
checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dist_mtl.balancers._arrays import ArrayLike, as_gramian, as_losses, to_torch
from dist_mtl.balancers.base import Balancer, BalancerOutput


def check_update_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"balancer.update_every must be an integer >= 1; got {value!r}")
    return int(value)


def check_task_sample(value: Any, num_tasks: int | None = None) -> int:
    """0 (off) or 1 <= S <= T; T is checked when known."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"balancer.task_sample must be 0 (off) or an integer in [1, T]; got {value!r}")
    if num_tasks is not None and value > num_tasks:
        raise ValueError(
            f"balancer.task_sample S={value} exceeds the number of tasks T={num_tasks}; use 0 (off) or "
            f"1 <= S <= {num_tasks}"
        )
    return int(value)


@dataclass
class Periodic(Balancer):
    """`balancer.update_every N`: the inner balancer solves every N adopted steps; the N - 1 steps in
    between reuse its coefficients and take one backward of sum_t c_t L_t (no Gramian, no exchange
    before the backward, no solve), whatever the inner balancer is.

    Which steps solve is decided by `reuse`, from `coefficients` and `age` (adopted steps since the
    last solve), and both move only in `follow`, which every rank calls after every step with the
    coordinator's broadcast result; so every rank takes the same path. Only the coordinator runs the
    inner balancer and `adopt`s its output. A skipped step changes neither. State (checkpointed): age,
    the reused coefficients and the inner balancer's state.
    """

    inner: Balancer
    every: int = 1
    coefficients: np.ndarray | None = field(default=None, init=False, repr=False)
    age: int = field(default=0, init=False)

    name = "update_every"

    def __post_init__(self) -> None:
        self.every = check_update_every(self.every)

    @property
    def needs_losses(self) -> bool:
        return self.inner.needs_losses

    @property
    def needs_gramian(self) -> bool:
        return self.inner.needs_gramian

    def __call__(self, M: ArrayLike | None, losses: ArrayLike | None = None) -> BalancerOutput:
        return self.inner(M, losses)

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        return self.inner.weights(M, losses)

    def reuse(self) -> np.ndarray | None:
        if self.coefficients is not None and self.age < self.every:
            return self.coefficients
        return None

    def follow(self, coefficients: torch.Tensor, skipped: bool) -> None:
        if skipped:
            return
        if self.reuse() is not None:
            self.age += 1
        else:
            self.coefficients = coefficients.detach().to("cpu", torch.float64).numpy().copy()
            self.age = 1

    def adopt(self, out: BalancerOutput) -> None:
        self.inner.adopt(out)

    def advance(self) -> None:
        self.inner.advance()

    def state_dict(self) -> dict[str, Any]:
        return {
            "age": self.age,
            "coefficients": None if self.coefficients is None else self.coefficients.tolist(),
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"age", "coefficients", "inner"}:
            raise ValueError(
                "balancer state with update_every must have keys age, coefficients, inner; "
                f"got {sorted(state)}"
            )
        self.inner.load_state_dict(state["inner"])
        c = state["coefficients"]
        self.coefficients = None if c is None else np.asarray(c, dtype=np.float64)
        self.age = int(state["age"])


def sample_tasks(num_tasks: int, size: int, seed: int, step: int) -> np.ndarray:
    """The sorted subset of `size` tasks balanced at `step`: a pure function of (T, S, seed, step), so
    every rank that draws it draws the same, and a resumed run draws what the uninterrupted one would."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x5453])))
    return np.sort(rng.choice(num_tasks, size=size, replace=False))


@dataclass
class TaskSample(Balancer):
    """`balancer.task_sample S`: stochastic sub-Jacobian descent. Each step the inner (Gramian)
    balancer solves on the S x S sub-Gramian of a seeded random subset of S tasks; each task outside
    the subset gets the mean coefficient of the sampled tasks that have a gradient (a task with a zero
    gradient, no label in the batch, gets 0 as everywhere else).

    This saves solve time at large T (a min-norm solve on S x S instead of T x T), not backward
    passes and not traffic: the step still back-propagates all T tasks and exchanges the full T x T
    Gramian (or rows), and d = G c is formed from all T gradients. The subset is a pure function of
    (seed, step) with `step` counting adopted steps. State (checkpointed): step and the inner state.
    """

    inner: Balancer
    size: int = 1
    seed: int = 0
    step: int = field(default=0, init=False)

    name = "task_sample"

    def __post_init__(self) -> None:
        self.size = check_task_sample(self.size)
        if self.size < 1:
            raise ValueError("balancer.task_sample must be >= 1 to wrap a balancer (0 means off)")
        if not self.inner.needs_gramian:
            raise ValueError(
                f"balancer.task_sample needs a Gramian balancer; {self.inner.name!r} weighs the losses "
                "alone (it costs one backward pass already), so task_sample would not change its cost"
            )

    @property
    def needs_losses(self) -> bool:
        return self.inner.needs_losses

    def subset(self, num_tasks: int) -> np.ndarray:
        return sample_tasks(num_tasks, check_task_sample(self.size, num_tasks), self.seed, self.step)

    def __call__(self, M: ArrayLike | None, losses: ArrayLike | None = None) -> BalancerOutput:
        if M is None:
            raise ValueError("balancer.task_sample needs the Gramian; got None")
        gramian = as_gramian(M)
        t = gramian.shape[0]
        task_losses = as_losses(losses, t) if self.needs_losses else None
        chosen = self.subset(t)
        sub_losses = None if task_losses is None else task_losses[chosen]
        out = self.inner(gramian[np.ix_(chosen, chosen)], sub_losses)
        sub = out.coefficients.numpy()
        has_gradient = np.diag(gramian) > 0.0
        sampled_with_grad = has_gradient[chosen]
        mean = float(sub[sampled_with_grad].mean()) if sampled_with_grad.any() else float(sub.mean())
        c = np.where(has_gradient | ~has_gradient.any(), mean, 0.0)
        c[chosen] = sub
        info = {**out.info, "task_sample_size": float(len(chosen))}
        return BalancerOutput(to_torch(c), info, out)

    def weights(self, M: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        out = self(M, losses)
        return out.coefficients.numpy(), out.info

    def adopt(self, out: BalancerOutput) -> None:
        self.inner.adopt(out.pending)
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"seed", "step", "inner"}:
            raise ValueError(
                f"balancer state with task_sample must have keys inner, seed, step; got {sorted(state)}"
            )
        self.inner.load_state_dict(state["inner"])
        self.seed, self.step = int(state["seed"]), int(state["step"])


def with_levers(
    balancer: Balancer, *, update_every: int = 1, task_sample: int = 0, seed: int = 0
) -> Balancer:
    """The configured balancer wrapped by its levers (none when both are off: the plain balancer, so
    its checkpoint state keeps the plain format)."""
    if check_task_sample(task_sample):
        balancer = TaskSample(balancer, task_sample, seed)
    if check_update_every(update_every) > 1:
        balancer = Periodic(balancer, update_every)
    return balancer
