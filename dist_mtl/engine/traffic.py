"""Bytes a rank sends and receives: per collective (the wrapper's accounting) and per step (the analytic
count of each protocol, for the README and the benchmark).

The per-collective models are the algorithms gloo runs on CPU, checked against the bytes each rank
writes to its sockets (/proc/self/io wchar): ring all-reduce, reduce-scatter plus gather-to-root for
reduce, a binomial tree for broadcast, a ring for all-gather, direct sends for gather and all-to-all.
NCCL's ring and tree algorithms move the same volumes to within a constant factor of the tree depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

F32 = 4
F64 = 8


def all_reduce_bytes(nbytes: int, size: int) -> tuple[int, int]:
    """Ring all-reduce: reduce-scatter then all-gather, 2 (g-1)/g n each way."""
    moved = 2 * (size - 1) * nbytes // size
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

    @property
    def tasks(self) -> int:
        return sum(self.split)

    @property
    def k(self) -> int:
        return len(self.split)


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def gather_payload_floats(compression: str, s: StepShape) -> int:
    """Elements (float32, or 16-bit for fp16/bf16) a rank sends to the coordinator in `gather`/`sketch`."""
    rows, p = max(s.split), s.params
    if compression == "none":
        return rows + rows * p
    if compression in ("fp16", "bf16"):
        return 2 * rows + rows * p  # losses travel bit-exact as two 16-bit halves
    if compression == "topk":
        return rows + 2 * rows * topk_count(p, s.topk_ratio)
    return rows + rows * s.sketch_size


def topk_count(params: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * params))


def wire_bytes(compression: str) -> int:
    return 2 if compression in ("fp16", "bf16") else F32


def step_bytes(protocol: str, s: StepShape, rank: int) -> tuple[int, int]:
    """Analytic (sent, received) bytes of one training step on `rank` (rank = r * K + k)."""
    t, k_size, d = s.tasks, s.k, s.replicas
    r, k = divmod(rank, k_size)
    world = d * k_size
    total = (0, 0)
    solution = broadcast_bytes(F64 * (2 * t + 1), world, rank)
    if protocol == "rep":
        total = _add(total, all_reduce_bytes(F32 * (s.all_head_params + t + t * t), world))
        total = _add(total, solution)
        return _add(total, all_reduce_bytes(F32 * s.params, world))
    mine = s.split[k]
    shard = -(-s.params // k_size)
    width = shard * k_size if protocol == "gramian" else s.params
    if d > 1:
        head = s.head_params[k] if s.head_params else 0
        total = _add(total, all_reduce_bytes(F32 * (head + max(s.split) + mine * width), d))
    if protocol == "gramian":
        send = [F32 * mine * shard] * k_size
        recv = [F32 * n * shard for n in s.split]
        total = _add(total, all_to_all_bytes(send, recv, k))
        if r == 0:
            total = _add(total, reduce_bytes(F32 * (t * t + t), k_size, k == 0))
        total = _add(total, solution)
        return _add(total, all_gather_bytes(F32 * shard, k_size))
    compression = "countsketch" if protocol == "sketch" else s.compression
    if r == 0:
        payload = wire_bytes(compression) * gather_payload_floats(compression, s)
        total = _add(total, gather_bytes(payload, k_size, k == 0))
    total = _add(total, solution)
    if compression == "none":
        return _add(total, broadcast_bytes(F32 * s.params, world, rank))
    return _add(total, all_reduce_bytes(F32 * width, k_size))
