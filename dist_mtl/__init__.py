"""dist_mtl: task-parallel multi-task learning with gradient balancing."""

__version__ = "0.1.0"
