"""The protocol registry: one class per protocol, chosen by name, owning its mode and byte model.

Single process, no process group: what is checked here is the wiring (names, modes, the dispatch of
`traffic.step_bytes`); the contract tests check that each class's step and byte model are right.
"""

from __future__ import annotations

import pytest

import dist_mtl.engine as engine
from dist_mtl import config
from dist_mtl.engine import traffic
from dist_mtl.engine.protocols import (
    PROTOCOL_MODE,
    PROTOCOLS,
    Protocol,
    TaskParallelProtocol,
    build_protocol,
    protocol_class,
)

SHAPE = traffic.StepShape(params=1000, split=(2, 2, 1), head_params=(14, 14, 7), all_head_params=35)


def test_registry_names_modes_and_config_agree() -> None:
    assert set(PROTOCOLS) == {"gather", "gramian", "sketch", "rep"}
    assert set(config.PROTOCOL_NAMES) == set(PROTOCOLS) == set(engine.PROTOCOL_NAMES)
    for name, cls in PROTOCOLS.items():
        assert issubclass(cls, Protocol) and cls.name == name
        assert PROTOCOL_MODE[name] == cls.mode
        assert (cls.mode == "exact") == issubclass(cls, TaskParallelProtocol)
    assert engine.PROTOCOL_MODE is PROTOCOL_MODE


def test_step_bytes_dispatches_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol added to the registry gets its own byte model from `step_bytes` (no branch on names)."""

    class Silent(Protocol):
        name = "silent"
        mode = "exact"

        @classmethod
        def bytes_per_step(cls, shape: traffic.StepShape, rank: int) -> tuple[int, int]:
            return rank, shape.params

        def __call__(self, x, y, rec):  # pragma: no cover - never stepped here
            raise NotImplementedError

    monkeypatch.setitem(PROTOCOLS, "silent", Silent)
    assert traffic.step_bytes("silent", SHAPE, 2) == (2, 1000)
    for name, cls in PROTOCOLS.items():
        assert traffic.step_bytes(name, SHAPE, 1) == cls.bytes_per_step(SHAPE, 1)


def test_unknown_protocol_names_the_field() -> None:
    with pytest.raises(ValueError, match="engine.protocol must be one of gather, gramian, sketch, rep"):
        protocol_class("ring")
    with pytest.raises(ValueError, match="got 'ring'"):
        build_protocol("ring", None)  # type: ignore[arg-type]
