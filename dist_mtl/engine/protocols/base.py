"""What every exchange protocol is: the trainer's `Step` on one rank, with its buffers and byte model.

A protocol class owns three things, so that adding one touches one file and the registry:
- its buffer layout (built once, in `__init__`, from a `StepContext`),
- its per-step exchange (`__call__`, the `dist_mtl.backend.Step` the trainer runs),
- its analytic byte model (`bytes_per_step`, what `traffic.step_bytes` and the contract test use).
`name` is the `engine.protocol` value and `mode` the `train.mode` it implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from dist_mtl.config import RunConfig
from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.coordinator import Coordinator
from dist_mtl.engine.traffic import F32, F64, StepShape, broadcast_bytes, reduce_bytes, total
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from dist_mtl.reference import StepResult
from dist_mtl.solve import LOSSES, Solution

if TYPE_CHECKING:  # layout imports the registry (PROTOCOL_MODE), so only for annotations here
    from dist_mtl.engine.layout import Layout


@dataclass(frozen=True)
class Groups:
    """This rank's world, task and replica groups."""

    world: Group
    task: Group
    replica: Group


@dataclass(frozen=True)
class StepContext:
    """Everything a protocol is built from on one rank, assembled by `Engine.make_step`."""

    cfg: RunConfig
    model: MultiTaskModel
    optimizer: torch.optim.Optimizer
    coordinator: Coordinator
    layout: Layout
    comm: Comm
    groups: Groups
    checksum: ReplicaChecksum
    fault: Callable[[int], None] | None  # fault injection for the tests (None in normal runs)


class Protocol(ABC):
    """One exchange protocol on one rank; subclasses are listed in `dist_mtl.engine.protocols.PROTOCOLS`."""

    name: ClassVar[str]  # engine.protocol
    mode: ClassVar[str]  # the train.mode it implements: "exact" or "rep"

    @classmethod
    @abstractmethod
    def bytes_per_step(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """Analytic (sent, received) bytes of one step on global `rank` (= r * K + k)."""

    @classmethod
    @abstractmethod
    def single_backward_bytes(cls, shape: StepShape, rank: int) -> tuple[int, int]:
        """Analytic (sent, received) bytes of a one-backward step (`shape.kind` LOSSES or REUSE: a loss
        balancer, or a step between updates of balancer.update_every): no Gramian moves."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> StepResult:
        """One training step on this rank's part (x, y) of the global batch (`Engine.data_part`)."""


def coefficients_from_losses(
    comm: Comm,
    coordinator: Coordinator,
    loss_buffer: torch.Tensor,
    group: Group,
    kind: str,
    kept: torch.Tensor | None,
    rec: StepRecorder,
) -> tuple[Solution | None, torch.Tensor]:
    """The coefficients of a one-backward step. LOSSES: `loss_buffer` (this rank's losses in place,
    zeros elsewhere) is reduced over `group` onto the coordinator, which solves and broadcasts c;
    returns (its Solution, c), and a skipped Solution (non-finite losses) ends the step. REUSE: (None,
    the kept coefficients)."""
    if kind != LOSSES:
        assert kept is not None
        return None, kept
    with rec.phase("exchange"):
        comm.reduce(loss_buffer, group, dst=0)
    solved, c = coordinator.solve(None, loss_buffer if coordinator.is_coordinator else None, rec)
    if solved.skipped:
        solved.info.update({"step/gramian": 0.0, "step/encoder_backwards": 0.0})
    return solved, c


def loss_solve_bytes(shape: StepShape, rank: int) -> tuple[int, int]:
    """A LOSSES step's exchange before its backward: the reduce of the T float32 losses over the world
    onto the coordinator, and the coordinator's broadcast of (c, losses, skip flag); nothing on REUSE."""
    if shape.kind != LOSSES:
        return 0, 0
    world = shape.replicas * shape.k
    return total(reduce_bytes(F32 * shape.tasks, world, rank == 0), solution_bytes(shape, rank))


def solution_bytes(shape: StepShape, rank: int) -> tuple[int, int]:
    """The coordinator's broadcast of (c, losses, skip flag): 2T + 1 float64 to the whole world."""
    return broadcast_bytes(F64 * (2 * shape.tasks + 1), shape.replicas * shape.k, rank)
