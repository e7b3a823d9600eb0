"""The one wrapper every collective of the engine goes through.

It runs the collective on a named group, times it, accounts the bytes this rank sends and receives
(the algorithm models in `traffic`) to the open phase of the step's recorder, and turns a failure
(a dead peer closes its sockets; a stalled one trips the group's timeout) into a `CollectiveError`
that names the operation, the group, the step and the timeout. Groups of one rank need no
communication, so their collectives never touch torch.distributed, and the collectives that return
what they received (gather, all-to-all) return the rank's own tensor instead of copying it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_mtl.engine import traffic
from dist_mtl.engine.compat import all_gather_into
from dist_mtl.observe import StepRecorder


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer rank died, stalled, or the network broke."""


@dataclass(frozen=True)
class Group:
    """A process group with the global ranks it spans, in group order."""

    name: str  # world | task | replica
    ranks: tuple[int, ...]
    pg: dist.ProcessGroup | None  # None for a group of one rank

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)


class Comm:
    """Runs, times and accounts collectives for one rank."""

    def __init__(self, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.rec: StepRecorder | None = None  # set for the duration of a training step
        self.step = 0  # 1-based number of the step in progress, for error messages

    @contextmanager
    def stepping(self, rec: StepRecorder, fault: Callable[[int], None] | None = None) -> Iterator[int]:
        """Number the next step (for error messages), account its collectives to `rec`, inject a fault."""
        self.rec, self.step = rec, self.step + 1
        if fault is not None:
            fault(self.step)
        try:
            yield self.step
        finally:
            self.rec = None

    def _fail(self, what: str, group: Group, exc: BaseException) -> CollectiveError:
        phase = self.rec.current_phase if self.rec is not None else None
        where = f"step {self.step}, phase {phase}" if self.rec is not None else "outside a step"
        return CollectiveError(
            f"rank {self.rank}: {what} over the {group.name} group (ranks {list(group.ranks)}) failed at "
            f"{where} (a dead or stalled peer fails a collective within engine.timeout_s="
            f"{self.timeout_s:g}s): {exc}"
        )

    def _run(self, what: str, group: Group, fn: Callable[[], object], moved: tuple[int, int]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except RuntimeError as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, ...)
            raise self._fail(what, group, exc) from exc
        if self.rec is not None:
            self.rec.add_bytes(moved[0], moved[1], seconds=time.perf_counter() - start)

    def _start(
        self, what: str, group: Group, launch: Callable[[], dist.Work | None], moved: tuple[int, int]
    ) -> Pending:
        """Launch an asynchronous collective; its bytes go to the exchange phase (it may be launched
        inside the backward), the seconds its `wait` blocks to the recorder's communication time."""
        try:
            work = launch()
        except RuntimeError as exc:
            raise self._fail(what, group, exc) from exc
        if self.rec is not None:
            self.rec.add_bytes(moved[0], moved[1], phase="exchange")
        return Pending(self, what, group, work)

    def start_all_reduce(self, tensor: torch.Tensor, group: Group) -> Pending:
        """`all_reduce`, asynchronously: the sum is in `tensor` once the returned work is waited."""
        if group.size == 1:
            return Pending(self, "all-reduce", group, None)
        moved = traffic.all_reduce_bytes(_nbytes(tensor), group.size)
        return self._start(
            "all-reduce", group, lambda: dist.all_reduce(tensor, group=group.pg, async_op=True), moved
        )

    def start_all_to_all(
        self,
        out: torch.Tensor,
        tensor: torch.Tensor,
        out_splits: Sequence[int],
        in_splits: Sequence[int],
        group: Group,
    ) -> Pending:
        """`all_to_all`, asynchronously, into `out` (which a group of one never touches: the caller
        then reads `tensor`)."""
        if group.size == 1:
            return Pending(self, "all-to-all", group, None)
        size = tensor.element_size()
        moved = traffic.all_to_all_bytes(
            [size * n for n in in_splits], [size * n for n in out_splits], group.index(self.rank)
        )
        return self._start(
            "all-to-all",
            group,
            lambda: dist.all_to_all_single(
                out, tensor, list(out_splits), list(in_splits), group=group.pg, async_op=True
            ),
            moved,
        )

    def start_all_gather(self, out: torch.Tensor, tensor: torch.Tensor, group: Group) -> Pending:
        """`all_gather`, asynchronously."""
        if group.size == 1:
            if out.data_ptr() != tensor.data_ptr():
                out.copy_(tensor.reshape(out.shape))
            return Pending(self, "all-gather", group, None)
        moved = traffic.all_gather_bytes(_nbytes(tensor), group.size)
        return self._start(
            "all-gather",
            group,
            lambda: all_gather_into(out.view(-1), tensor.reshape(-1), group.pg, async_op=True),
            moved,
        )

    def all_reduce(self, tensor: torch.Tensor, group: Group) -> None:
        """In-place sum over the group."""
        if group.size > 1:
            moved = traffic.all_reduce_bytes(_nbytes(tensor), group.size)
            self._run("all-reduce", group, lambda: dist.all_reduce(tensor, group=group.pg), moved)

    def reduce(self, tensor: torch.Tensor, group: Group, dst: int = 0) -> None:
        """In-place sum onto the group's rank `dst` (group index); other ranks' tensors become scratch."""
        if group.size > 1:
            is_root = group.index(self.rank) == dst
            moved = traffic.reduce_bytes(_nbytes(tensor), group.size, is_root)
            root = group.ranks[dst]
            self._run("reduce", group, lambda: dist.reduce(tensor, dst=root, group=group.pg), moved)

    def broadcast(self, tensor: torch.Tensor, group: Group, src: int = 0) -> None:
        """In-place copy of the group's rank `src` (group index) tensor to every rank."""
        if group.size > 1:
            rel = (group.index(self.rank) - src) % group.size
            moved = traffic.broadcast_bytes(_nbytes(tensor), group.size, rel)
            self._run(
                "broadcast",
                group,
                lambda: dist.broadcast(tensor, src=group.ranks[src], group=group.pg),
                moved,
            )

    def all_gather(self, out: torch.Tensor, tensor: torch.Tensor, group: Group) -> None:
        """`out` (size x numel) receives every rank's `tensor` in group order."""
        if group.size == 1:
            if out.data_ptr() != tensor.data_ptr():  # the caller may already have written into `out`
                out.copy_(tensor.reshape(out.shape))
            return
        moved = traffic.all_gather_bytes(_nbytes(tensor), group.size)
        self._run(
            "all-gather",
            group,
            lambda: all_gather_into(out.view(-1), tensor.reshape(-1), group.pg),
            moved,
        )

    def gather(
        self, tensor: torch.Tensor, out: torch.Tensor | None, group: Group, dst: int = 0
    ) -> torch.Tensor | None:
        """Group rank `dst` receives every rank's equally sized `tensor` into `out` (size x numel) and
        gets it back (None elsewhere); in a group of one that is `tensor` itself, seen as 1 x numel.

        Point-to-point receives straight into the rows of `out` (gloo's gather stages the whole
        output in a temporary of the same size first). The root's own row is copied only if
        `tensor` is not already that row of `out`.
        """
        if group.size == 1:
            return tensor.view(1, -1)
        index = group.index(self.rank)
        moved = traffic.gather_bytes(_nbytes(tensor), group.size, index == dst)
        if index != dst:
            self._run("gather", group, lambda: dist.send(tensor, dst=group.ranks[dst], group=group.pg), moved)
            return None
        if out is None:
            raise ValueError("the root of a gather needs an output buffer")
        rows = out.view(group.size, -1)

        def receive() -> None:
            peers = [j for j in range(group.size) if j != dst]
            works = [dist.irecv(rows[j], src=group.ranks[j], group=group.pg) for j in peers]
            if rows[dst].data_ptr() != tensor.data_ptr():
                rows[dst].copy_(tensor.reshape(-1))
            for work in works:
                work.wait()

        self._run("gather", group, receive, moved)
        return out

    def all_to_all(
        self,
        out: torch.Tensor | None,
        tensor: torch.Tensor,
        out_splits: Sequence[int],
        in_splits: Sequence[int],
        group: Group,
    ) -> torch.Tensor:
        """Block j of `tensor` (in_splits[j] elements) goes to group rank j; `out` receives the blocks
        and is returned. In a group of one the rank keeps its only block: `tensor` itself is returned
        (`out` may be None)."""
        if group.size == 1:
            return tensor
        if out is None:
            raise ValueError("all_to_all over more than one rank needs an output buffer")
        size = tensor.element_size()
        moved = traffic.all_to_all_bytes(
            [size * n for n in in_splits], [size * n for n in out_splits], group.index(self.rank)
        )
        self._run(
            "all-to-all",
            group,
            lambda: dist.all_to_all_single(out, tensor, list(out_splits), list(in_splits), group=group.pg),
            moved,
        )
        return out

    def reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor, group: Group) -> None:
        """`out` receives the group-wide sum of block i (out.numel() elements) of `tensor` on group
        rank i."""
        if group.size == 1:
            if out.data_ptr() != tensor.data_ptr():
                out.copy_(tensor.reshape(out.shape))
            return
        moved = traffic.reduce_scatter_bytes(_nbytes(tensor), group.size)
        self._run(
            "reduce-scatter",
            group,
            lambda: dist.reduce_scatter_tensor(out.view(-1), tensor.reshape(-1), group=group.pg),
            moved,
        )

    def gather_object(self, obj: Any, group: Group, dst: int = 0) -> list[Any] | None:
        """Pickled objects to group rank `dst` (checkpoint time only, so no bytes are accounted)."""
        if group.size == 1:
            return [obj]
        is_root = group.index(self.rank) == dst
        out: list[Any] | None = [None] * group.size if is_root else None
        self._run(
            "gather of objects",
            group,
            lambda: dist.gather_object(obj, out, dst=group.ranks[dst], group=group.pg),
            (0, 0),
        )
        return out

    def barrier(self, group: Group) -> None:
        if group.size > 1:
            self._run("barrier", group, lambda: dist.barrier(group=group.pg), (0, 0))

    def start_send(self, tensor: torch.Tensor, group: Group, dst: int = 0, tag: int = 0) -> Pending:
        """Point-to-point send of `tensor` to group rank `dst`, asynchronously: one round of a gather
        spread over the backward passes (accounted like a gather's sender). `tag` tells the rounds
        apart. gloo reports the send complete only once it is waited."""
        moved = (_nbytes(tensor), 0)
        return self._start(
            "send",
            group,
            lambda: dist.isend(tensor, dst=group.ranks[dst], group=group.pg, tag=tag),
            moved,
        )

    def start_receive(self, outs: Sequence[tuple[int, torch.Tensor]], group: Group, tag: int = 0) -> Pending:
        """Point-to-point receives, asynchronously, from group rank j into each (j, buffer) of `outs`:
        one round of a gather's root (accounted like it); one `Pending` for them all."""
        if not outs:
            return Pending(self, "receive", group, None)
        moved = (0, sum(_nbytes(out) for _, out in outs))

        def launch() -> _Works:
            return _Works([dist.irecv(out, src=group.ranks[j], group=group.pg, tag=tag) for j, out in outs])

        return self._start("receive", group, launch, moved)  # type: ignore[arg-type]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Pending:
    """A collective in flight (`Comm.start_*`). `done` polls without blocking; `wait` blocks until it
    has finished (on CUDA it only orders the current stream after it: NCCL runs on its own stream)
    and turns a failure into a `CollectiveError`. Waiting twice is free."""

    def __init__(self, comm: Comm, what: str, group: Group, work: dist.Work | None) -> None:
        self.comm, self.what, self.group, self.work = comm, what, group, work

    def done(self) -> bool:
        try:
            return self.work is None or self.work.is_completed()
        except RuntimeError as exc:
            raise self.comm._fail(self.what, self.group, exc) from exc

    def wait(self) -> None:
        if self.work is None:
            return
        start = time.perf_counter()
        try:
            self.work.wait()
        except RuntimeError as exc:
            raise self.comm._fail(self.what, self.group, exc) from exc
        self.work = None
        if self.comm.rec is not None:
            self.comm.rec.add_comm_seconds(time.perf_counter() - start)


class _Works:
    """Several point-to-point works seen as one (`Comm.start_receive`)."""

    def __init__(self, works: Sequence[dist.Work]) -> None:
        self.works = list(works)

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()
