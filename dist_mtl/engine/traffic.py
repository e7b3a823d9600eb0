"""Bytes a rank sends and receives per collective (the wrapper's accounting, and the pieces of each
protocol's analytic `bytes_per_step`); `step_bytes` looks the protocol up by name.

The per-collective models are the algorithms gloo runs on CPU, checked against the bytes each rank
writes to its sockets (/proc/self/io wchar): ring all-reduce, reduce-scatter plus gather-to-root for
reduce, a binomial tree for broadcast, a ring for all-gather, direct sends for gather and all-to-all.
NCCL's ring and tree algorithms move the same volumes to within a constant factor of the tree depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_mtl.config import EngineConfig

F32 = 4
F64 = 8


def all_reduce_bytes(nbytes: int, size: int) -> tuple[int, int]:
    """Ring all-reduce: reduce-scatter then all-gather, 2 (g-1)/g n each way."""
    moved = 2 * (size - 1) * nbytes // size
    return moved, moved


def reduce_scatter_bytes(nbytes: int, size: int) -> tuple[int, int]:
    """Ring reduce-scatter: (g-1)/g n each way."""
    moved = (size - 1) * nbytes // size
    return moved, moved


def reduce_bytes(nbytes: int, size: int, is_root: bool) -> tuple[int, int]:
    """Ring reduce-scatter, then every non-root sends its reduced chunk to the root."""
    scatter = (size - 1) * nbytes // size
    if is_root:
        return scatter, scatter + (size - 1) * (nbytes // size)
    return scatter + nbytes // size, scatter


def broadcast_bytes(nbytes: int, size: int, rel_rank: int) -> tuple[int, int]:
    """Binomial tree: a rank forwards the whole message to each of its children."""
    children = 0
    step = 1 << (rel_rank.bit_length() if rel_rank else 0)
    while rel_rank + step < size:
        children += 1
        step <<= 1
    return children * nbytes, (nbytes if rel_rank else 0)


def all_gather_bytes(nbytes_per_rank: int, size: int) -> tuple[int, int]:
    """Ring all-gather: every rank forwards g-1 chunks and receives g-1 chunks."""
    moved = (size - 1) * nbytes_per_rank
    return moved, moved


def gather_bytes(nbytes_per_rank: int, size: int, is_root: bool) -> tuple[int, int]:
    return (0, (size - 1) * nbytes_per_rank) if is_root else (nbytes_per_rank, 0)


def all_to_all_bytes(send_bytes: Sequence[int], recv_bytes: Sequence[int], index: int) -> tuple[int, int]:
    """Everything except the block a rank keeps for itself."""
    return sum(send_bytes) - send_bytes[index], sum(recv_bytes) - recv_bytes[index]


@dataclass(frozen=True)
class StepShape:
    """What the per-step traffic depends on."""

    params: int  # P, shared parameters
    split: tuple[int, ...]  # tasks per rank of a task group (length K)
    replicas: int = 1  # D
    head_params: tuple[int, ...] = ()  # parameters of the owned heads per position k (length K)
    all_head_params: int = 0  # parameters of all heads (rep)
    compression: str = "none"
    topk_ratio: float = 0.01
    sketch_size: int = 4096
    # What the step does (`dist_mtl.solve.step_plan`): "gramian" (the protocol's exchange), "losses"
    # (a loss balancer: T losses to the coordinator, one backward) or "reuse" (update_every between
    # updates: one backward, no exchange before it)
    kind: str = "gramian"
    overlap: bool = False  # engine.overlap: per-task (exact) or bucketed (rep) collectives
    wire: int = F32  # bytes per element of the gramian all-to-all (engine.wire_dtype)
    sharded: bool = False  # engine.shard_optimizer on a gramian run with more than one rank
    bucket_bytes: int = 25 * 2**20  # rep with overlap: engine.bucket_mb in bytes
    chunks: int = 4  # gramian with overlap: engine.overlap_chunks
    # rep with overlap: the shared parameters' sizes in parameter order, which set the buckets
    # (`dist_mtl.engine.buckets`); () counts P as one parameter (cap-sized buckets from the end)
    shared_sizes: tuple[int, ...] = ()

    @classmethod
    def engine_options(cls, e: EngineConfig) -> dict[str, Any]:
        """The fields of the engine's config that change the bytes, as keyword arguments."""
        return {
            "overlap": e.overlap,
            "wire": 2 if e.wire_dtype == "bfloat16" else F32,
            "sharded": e.shard_optimizer and e.protocol == "gramian",
            "bucket_bytes": int(e.bucket_mb * 2**20),
            "chunks": e.overlap_chunks,
            "compression": e.compression,
            "topk_ratio": e.topk_ratio,
            "sketch_size": e.sketch_size,
        }

    @property
    def tasks(self) -> int:
        return sum(self.split)

    @property
    def k(self) -> int:
        return len(self.split)


def total(*moves: tuple[int, int]) -> tuple[int, int]:
    """The sum of (sent, received) pairs."""
    return sum(m[0] for m in moves), sum(m[1] for m in moves)


def step_bytes(protocol: str, s: StepShape, rank: int) -> tuple[int, int]:
    """Analytic (sent, received) bytes of one training step on `rank` (rank = r * K + k): the byte
    model of the protocol class registered under that name (its one-backward model for `s.kind`
    "losses" or "reuse")."""
    from dist_mtl.engine.protocols import protocol_class  # the protocols import this module

    cls = protocol_class(protocol)
    return cls.bytes_per_step(s, rank) if s.kind == "gramian" else cls.single_backward_bytes(s, rank)
