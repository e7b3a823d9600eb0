"""The task-parallel distributed engine: D x K layouts, exchange protocols, coordinator solve, accounting.

`run_distributed` is what `python -m dist_mtl.train` runs on every rank when WORLD_SIZE > 1.
"""

from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError, Comm, Group
from dist_mtl.engine.launch import process_group, run_distributed
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
    "run_distributed",
    "step_bytes",
]
