"""The seam between the training loop and a parallel backend.

The trainer knows a backend only through `Backend`: make the step, make the model complete for
evaluation and checkpoints, checkpoint state, an in-place sum over ranks and a barrier. `SingleProcess`
implements it with the reference steps and no collectives; the distributed engine
(`dist_mtl.engine.Engine`) implements it with process groups. Neither imports the trainer, and a
further backend (DeepSpeed) plugs in here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dist_mtl.balancers import Balancer
from dist_mtl.config import RunConfig
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import ExactStep, RepStep, StepResult


def full_state(model: MultiTaskModel, optimizer: torch.optim.Optimizer, balancer: Balancer) -> dict[str, Any]:
    """The single-process checkpoint state: what every backend writes and reads."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "balancer": balancer.state_dict(),
    }


def load_full_state(
    ckpt: dict[str, Any], model: MultiTaskModel, optimizer: torch.optim.Optimizer, balancer: Balancer
) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    balancer.load_state_dict(ckpt["balancer"])


class Step(Protocol):
    """One training step on this rank's part of the global batch (`Backend.data_part`); implemented
    by the reference (one part: the whole batch) and by the engine."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult: ...


class StopAgreement(Protocol):
    """How the ranks agree on the step after which a run stops (`dist_mtl.stop`)."""

    def vote(self, reason: int) -> int:
        """Contribute this rank's stop reason; returns the reason all ranks agreed on (the same on
        every rank at the same step; the engine's lags one step so no rank ever waits for it)."""
        ...

    def settle(self) -> int:
        """Finish any outstanding vote (before a checkpoint or the end of the loop)."""
        ...


class LocalStopVote:
    """One process: its own stop reason is the agreement, with no lag."""

    def vote(self, reason: int) -> int:
        return reason

    def settle(self) -> int:
        return 0


class Backend(Protocol):
    """What the training loop needs from a single process or a rank of a distributed run."""

    rank: int
    world_size: int
    device: torch.device
    # (index, parts): this rank reads part `index` of `parts` disjoint parts of every global batch;
    # the ranks of one task group share a part (exact mode), every rank is its own part in rep.
    data_part: tuple[int, int]
    stop_vote: StopAgreement

    def make_step(
        self, cfg: RunConfig, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer
    ) -> Step:
        """Build the step once the model, balancer and optimizer exist; called once, before any other hook."""
        ...

    def gather_model(self) -> None:
        """Make this rank's model complete and consistent (heads owned elsewhere, norm statistics)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The single-process checkpoint (model, optimizer, balancer) on rank 0; may be empty elsewhere."""
        ...

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a single-process checkpoint on every rank."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """In-place sum over all ranks (identity in one process)."""
        ...

    def barrier(self) -> None:
        """Wait for every rank (nothing in one process)."""
        ...


class SingleProcess:
    """One process, no collectives: the reference steps and the full state on this process."""

    rank = 0
    world_size = 1
    data_part = (0, 1)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stop_vote = LocalStopVote()
        self._parts: tuple[MultiTaskModel, torch.optim.Optimizer, Balancer] | None = None

    def make_step(
        self, cfg: RunConfig, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer
    ) -> Step:
        self._parts = (model, optimizer, balancer)
        if cfg.train.mode == "exact":
            return ExactStep(model, balancer, optimizer)
        return RepStep(model, balancer, optimizer, cfg.train.descent_check_every)

    def _built(self) -> tuple[MultiTaskModel, torch.optim.Optimizer, Balancer]:
        if self._parts is None:
            raise RuntimeError("SingleProcess.make_step must be called before the state hooks")
        return self._parts

    def gather_model(self) -> None:
        """Nothing to gather: this process holds the whole model."""

    def state_dict(self) -> dict[str, Any]:
        return full_state(*self._built())

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        load_full_state(ckpt, *self._built())

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """One process: the sum is the tensor itself."""

    def barrier(self) -> None:
        """One process: nothing to wait for."""
