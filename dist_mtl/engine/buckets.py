"""Bucketed all-reduce of a flat gradient buffer during the backward that fills it (rep, engine.overlap).

The buffer's parameters have their `.grad` as views of one flat tensor (`FlatGradBuffer`), in
parameter order; backward produces gradients roughly in reverse parameter order. The buffer is cut
into buckets of `cap` elements counted from its END: bucket 0 is the last `cap` elements (the first
gradients backward produces), and the last bucket, the remainder at the front, is the smallest, so
the collective still exposed after the backward ends is the shortest.

Why fixed ranges rather than DDP's whole parameters per bucket: the bucket sizes are then a function of
P and the cap alone, so the analytic byte model (`traffic.StepShape`, which knows P, not the parameter
sizes) equals what the wrapper accounts. A parameter may straddle a boundary; a bucket is ready once
EVERY parameter overlapping it has its gradient accumulated (a parameter larger than a bucket makes
all the buckets it covers ready at once).

Collectives over one group must be issued in the same order on every rank, so bucket b is launched
only once buckets 0..b-1 are: readiness is counted in the parameters' post-accumulate-grad hooks
(plain Python counters, no device sync) and the launched prefix grows as far as it is ready. A
parameter that receives no gradient (unused in the graph) never fires its hook; `finish` launches
every bucket not launched yet, in bucket order, and waits them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dist_mtl.engine.comm import Pending


def bucket_ranges(numel: int, cap: int) -> list[tuple[int, int]]:
    """[start, end) of each bucket of a flat buffer of `numel` elements, bucket 0 at the end."""
    if cap < 1:
        raise ValueError(f"a bucket holds at least one element, got cap={cap}")
    return [(max(0, end - cap), end) for end in range(numel, 0, -cap)]


def bucket_sizes(numel: int, cap: int) -> list[int]:
    """Elements per bucket, in launch order (what the byte model sums over)."""
    return [end - start for start, end in bucket_ranges(numel, cap)]


def cap_elements(bucket_bytes: int, element_size: int) -> int:
    """Elements per bucket for engine.bucket_mb (at least one)."""
    return max(1, bucket_bytes // element_size)


class BucketPlan:
    """Which buckets each parameter overlaps, and how many parameters each bucket waits for."""

    def __init__(self, sizes: Sequence[int], cap: int) -> None:
        self.ranges = bucket_ranges(sum(sizes), cap)
        self.members: list[list[int]] = []  # per parameter: the buckets it overlaps
        self.waits = [0] * len(self.ranges)  # per bucket: parameters overlapping it
        total, offset = sum(sizes), 0
        for n in sizes:
            # Bucket b covers [total - (b + 1) cap, total - b cap), clipped at 0.
            first = (total - offset - n) // cap if n else 0
            last = (total - offset - 1) // cap if n else -1
            buckets = list(range(first, last + 1)) if n else []
            self.members.append(buckets)
            for b in buckets:
                self.waits[b] += 1
            offset += n


class BucketedAllReduce:
    """Launches `launch(view)` for each bucket of `buffer` as soon as its parameters' gradients are in.

    `arm()` before the backward into the buffer, `finish()` after it (launches what is left, waits
    all); hooks fire on every backward into these parameters but act only between the two.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        buffer: torch.Tensor,
        cap: int,
        launch: Callable[[torch.Tensor], Pending],
    ) -> None:
        self.plan = BucketPlan([p.numel() for p in params], cap)
        self.views = [buffer[start:end] for start, end in self.plan.ranges]
        self.launch = launch
        self.armed = False
        self.remaining: list[int] = []
        self.pending: list[Pending] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            self.ready(index)

        return hook

    def arm(self) -> None:
        """Expect one backward: every bucket waits for all its parameters again."""
        if self.pending:
            raise RuntimeError("arm() while buckets of the previous backward are still pending")
        self.remaining = list(self.plan.waits)
        self.armed = True

    def ready(self, index: int) -> None:
        """Parameter `index` has its gradient: launch every bucket of the ready prefix."""
        if not self.armed:
            return
        for b in self.plan.members[index]:
            self.remaining[b] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while len(self.pending) < len(self.views) and self.remaining[len(self.pending)] == 0:
            self.pending.append(self.launch(self.views[len(self.pending)]))

    def finish(self) -> None:
        """Launch the buckets not launched yet (unused parameters'), in order, then wait them all."""
        self.armed = False
        while len(self.pending) < len(self.views):
            self.pending.append(self.launch(self.views[len(self.pending)]))
        for work in self.pending:
            work.wait()
        self.pending = []

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
