"""The exchange protocols, one class each, found by name (`engine.protocol`) as balancers are.

To add a protocol: subclass `Protocol` (or `TaskParallelProtocol` for an exact-mode protocol, which
then only lays out its block and writes its exchange), set `name` and `mode`, implement
`bytes_per_step` and the step, and list the class in `PROTOCOLS`; `PROTOCOL_MODE` (what config
checks pair with train.mode) and `traffic.step_bytes` follow. `dist_mtl.config.PROTOCOL_NAMES` lists
the names again (config cannot import the engine); a unit test compares the two.
"""

from __future__ import annotations

from dist_mtl.engine.protocols.base import Groups, Protocol, StepContext
from dist_mtl.engine.protocols.exact import TaskBlock, TaskParallelProtocol
from dist_mtl.engine.protocols.gather import GatherProtocol, SketchProtocol
from dist_mtl.engine.protocols.gramian import GramianProtocol
from dist_mtl.engine.protocols.rep import RepProtocol

PROTOCOLS: dict[str, type[Protocol]] = {
    p.name: p for p in (GatherProtocol, GramianProtocol, SketchProtocol, RepProtocol)
}
# Which train.mode each protocol implements; every balancer works with every protocol (they all
# reduce to a function of the Gramian), so the mode is the only pairing that can be wrong.
PROTOCOL_MODE: dict[str, str] = {name: p.mode for name, p in PROTOCOLS.items()}


def protocol_class(name: str) -> type[Protocol]:
    if name not in PROTOCOLS:
        raise ValueError(f"engine.protocol must be one of {', '.join(PROTOCOLS)}; got {name!r}")
    return PROTOCOLS[name]


def build_protocol(name: str, ctx: StepContext) -> Protocol:
    """The step of protocol `name` on this rank, its buffers allocated once here."""
    return protocol_class(name)(ctx)


__all__ = [
    "PROTOCOLS",
    "PROTOCOL_MODE",
    "GatherProtocol",
    "GramianProtocol",
    "Groups",
    "Protocol",
    "RepProtocol",
    "SketchProtocol",
    "StepContext",
    "TaskBlock",
    "TaskParallelProtocol",
    "build_protocol",
    "protocol_class",
]
