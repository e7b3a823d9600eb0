"""The gramian protocol's overlap chunks leave when every parameter they cover has its gradient (the
post-accumulate-grad hooks). An encoder that uses a parameter twice (tied weights) must still send
whole gradients: autograd sums a parameter's uses before it accumulates, so the hook fires once; the
step equals the one without overlap. An untied encoder's later layer leaves early, and the step's
`overlap/early_chunks` counts it.

One rank (world size 1, gloo, in this process), layout 1 x 1: the task group is the rank itself, so
the chunks' hooks and rounds run without peers."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dist_mtl.build import build_balancer_for, build_optimizer
from dist_mtl.config import load_config
from dist_mtl.engine.launch import process_group
from dist_mtl.engine.layout import resolve_layout
from dist_mtl.engine.runtime import Engine
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import StepRecorder
from tests.distributed.harness import free_port

pytestmark = [pytest.mark.distributed]
CPU = torch.device("cpu")


class TiedEncoder(nn.Module):
    """The same square layer applied twice: its weight's gradient accumulates in two parts."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = self.first if tied else nn.Linear(8, 8)
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def step_once(tied: bool, overrides: list[str]) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One step on one rank; the solution's diagnostics and the parameters after it."""
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.num_tasks=3",
            "engine.protocol=gramian",
            "engine.replicas=1",
            "engine.task_parallel=1",
            "engine.checksum_every=0",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = MultiTaskModel(TiedEncoder(tied), [nn.Linear(8, 2) for _ in range(3)])
    layout = resolve_layout(cfg, 1, 3)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in rendezvous}
    os.environ.update(rendezvous)  # for this process group only: later tests spawn ranks of their own
    try:
        with process_group(layout, CPU, 30.0) as mesh:
            engine = Engine(cfg, layout, mesh, CPU)
            optimizer = build_optimizer(cfg, list(model.parameters()))
            step = engine.make_step(cfg, model, build_balancer_for(cfg), optimizer)
            x, y = torch.randn(16, 8), torch.randint(0, 2, (16, 3))
            info = step(x, y, StepRecorder()).solution.info
            return info, [p.detach().clone() for p in model.parameters()]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_step_equals_the_step_without_overlap(tied: bool) -> None:
    info, chunked = step_once(tied, [])
    _, serial = step_once(tied, ["engine.overlap=false"])
    for a, b in zip(chunked, serial, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # tied: every chunk holds part of the one square weight, whose gradient comes last: nothing early
    assert info["overlap/early_chunks"] == (0.0 if tied else 6.0)


def test_untied_encoder_sends_chunks_during_the_backward() -> None:
    """K = 1, P = 144 in 4 chunks of 36: the second layer (flat 72-144) fills chunks 2 and 3 alone, so
    they leave before the first layer's gradient exists: 2 early chunks per task, 3 tasks; with one
    chunk per task nothing is counted (the round leaves when the backward has ended)."""
    assert step_once(False, [])[0]["overlap/early_chunks"] == 6.0
    assert "overlap/early_chunks" not in step_once(False, ["engine.overlap_chunks=1"])[0]
