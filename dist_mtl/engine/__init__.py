"""The task-parallel distributed engine: D x K layouts, exchange protocols, coordinator solve, accounting.

`Engine` is the distributed `dist_mtl.backend.Backend`; `dist_mtl.train` builds it on every rank when
WORLD_SIZE > 1. The engine never imports the trainer.
"""

from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError, Comm, Group
from dist_mtl.engine.launch import process_group
from dist_mtl.engine.layout import Layout, check_engine_config, resolve_layout
from dist_mtl.engine.protocols import PROTOCOL_MODE, PROTOCOLS, Protocol, build_protocol
from dist_mtl.engine.runtime import Engine
from dist_mtl.engine.traffic import StepShape, step_bytes

PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_MODE",
    "PROTOCOL_NAMES",
    "CollectiveError",
    "Comm",
    "Engine",
    "Group",
    "Layout",
    "Protocol",
    "ReplicaDivergenceError",
    "StepShape",
    "build_protocol",
    "check_engine_config",
    "process_group",
    "resolve_layout",
    "step_bytes",
]
