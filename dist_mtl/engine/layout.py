"""Which rank does what: the D x K layout, the task split, and every check that can fail before launch.

Ranks are numbered row-major over a (replica, task) mesh: rank = r * K + k. The K ranks of replica r
form a task group (same batch slice, tasks split between them); the D ranks with the same k form a
replica group (same tasks, different batch slices). Global rank 0 is the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_mtl.config import ConfigError, EngineConfig, RunConfig
from dist_mtl.engine.protocols import PROTOCOL_MODE


@dataclass(frozen=True)
class Layout:
    """A validated D x K layout with the tasks of each rank of a task group."""

    replicas: int  # D
    task_parallel: int  # K
    split: tuple[int, ...]  # tasks of each of the K ranks of a task group, in task order

    @property
    def world_size(self) -> int:
        return self.replicas * self.task_parallel

    @property
    def num_tasks(self) -> int:
        return sum(self.split)

    @property
    def max_tasks(self) -> int:
        return max(self.split)

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica r, position k in the task group) of a global rank."""
        return divmod(rank, self.task_parallel)

    def tasks_of(self, k: int) -> range:
        """The contiguous block of tasks owned by position k of every task group."""
        start = sum(self.split[:k])
        return range(start, start + self.split[k])

    def task_group(self, replica: int) -> list[int]:
        return [replica * self.task_parallel + k for k in range(self.task_parallel)]

    def replica_group(self, k: int) -> list[int]:
        return [r * self.task_parallel + k for r in range(self.replicas)]


def balanced_split(num_tasks: int, parts: int) -> tuple[int, ...]:
    """Contiguous blocks whose sizes differ by at most one (the first T mod K ranks take one more)."""
    base, extra = divmod(num_tasks, parts)
    return tuple(base + (1 if k < extra else 0) for k in range(parts))


def check_engine_config(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """Checks that need only the config and W; returns (D, K). Raises ConfigError naming the field."""
    e = cfg.engine
    mode = PROTOCOL_MODE[e.protocol]
    if cfg.train.mode != mode:
        valid = [p for p, m in PROTOCOL_MODE.items() if m == cfg.train.mode]
        raise ConfigError(
            f"engine.protocol {e.protocol!r} implements train.mode {mode!r} but train.mode is "
            f"{cfg.train.mode!r}; with train.mode {cfg.train.mode!r} engine.protocol must be one of "
            f"{', '.join(valid)}"
        )
    if e.compression != "none" and e.protocol != "gather":
        raise ConfigError(
            f"engine.compression {e.compression!r} applies only to engine.protocol 'gather' "
            f"(protocol is {e.protocol!r}); valid here: none"
        )
    # Value ranges (topk_ratio, sketch_size, timeout_s, ...) are checked once, in config.validate.
    replicas, parallel = _degrees(e, world_size)
    per = world_size if e.protocol == "rep" else replicas
    field = "the world size" if e.protocol == "rep" else f"engine.replicas D={replicas}"
    if cfg.data.batch_size % per:
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} is not divisible by {field} ({per}); every "
            f"{'rank' if e.protocol == 'rep' else 'replica'} needs an equal slice of the global batch"
        )
    return replicas, parallel


def _degrees(e: EngineConfig, world_size: int) -> tuple[int, int]:
    if e.protocol == "rep":
        if e.task_parallel not in (0, 1):
            raise ConfigError(
                f"engine.task_parallel must be 0 or 1 with engine.protocol 'rep' (pure data parallelism); "
                f"got {e.task_parallel}"
            )
        if e.replicas not in (0, world_size):
            raise ConfigError(
                f"engine.replicas must be 0 or the world size {world_size} with engine.protocol 'rep'; "
                f"got {e.replicas}"
            )
        return world_size, 1
    d, k = e.replicas, e.task_parallel
    if d == 0 and k == 0:
        d, k = 1, world_size
    elif d == 0:
        if world_size % k:
            raise ConfigError(f"engine.task_parallel K={k} does not divide the world size W={world_size}")
        d = world_size // k
    elif k == 0:
        if world_size % d:
            raise ConfigError(f"engine.replicas D={d} does not divide the world size W={world_size}")
        k = world_size // d
    if d * k != world_size:
        raise ConfigError(
            f"engine.replicas x engine.task_parallel = {d} x {k} = {d * k} but the world size is "
            f"W={world_size}; "
            "need W = D x K"
        )
    return d, k


def resolve_layout(cfg: RunConfig, world_size: int, num_tasks: int) -> Layout:
    """The full layout once T is known: K <= T and a split that covers the T tasks."""
    replicas, parallel = check_engine_config(cfg, world_size)
    if parallel > num_tasks:
        raise ConfigError(
            f"engine.task_parallel K={parallel} exceeds the number of tasks T={num_tasks}: every rank of a "
            f"task group needs at least one task (use K <= {num_tasks}, or engine.replicas for the rest)"
        )
    split = tuple(cfg.engine.split) or balanced_split(num_tasks, parallel)
    if len(split) != parallel:
        raise ConfigError(
            f"engine.split has {len(split)} entries {list(split)} but engine.task_parallel is K={parallel}"
        )
    if sum(split) != num_tasks or min(split) < 1:
        raise ConfigError(
            f"engine.split {list(split)} must give every one of the K={parallel} ranks >= 1 task and sum to "
            f"T={num_tasks}; it sums to {sum(split)}"
        )
    return Layout(replicas, parallel, split)
