"""The task-parallel distributed engine: D x K layouts, exchange protocols, coordinator solve, accounting.

`Engine` is the distributed `dist_mtl.backend.Backend`; `dist_mtl.train` builds it on every rank when
WORLD_SIZE > 1. The engine never imports the trainer.
"""

from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError, Comm, Group
from dist_mtl.engine.launch import process_group
from dist_mtl.engine.layout import PROTOCOL_MODE, Layout, check_engine_config, resolve_layout
from dist_mtl.engine.runtime import Engine
from dist_mtl.engine.traffic import StepShape, step_bytes

__all__ = [
    "PROTOCOL_MODE",
    "CollectiveError",
    "Comm",
    "Engine",
    "Group",
    "Layout",
    "ReplicaDivergenceError",
    "StepShape",
    "check_engine_config",
    "process_group",
    "resolve_layout",
    "step_bytes",
]
