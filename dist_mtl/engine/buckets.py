"""Bucketed all-reduce of a flat gradient buffer during the backward that fills it (rep, engine.overlap).

The buffer's parameters have their `.grad` as views of one flat tensor (`FlatGradBuffer`), in
parameter order; backward produces gradients roughly in reverse parameter order. Buckets are
contiguous ranges of the buffer formed as DDP forms them: walking the parameters in reverse order,
whole parameters join the open bucket while it stays within `cap` elements; a parameter alone larger
than `cap` is cut, from its end, into `cap`-sized buckets, and its remainder (its first elements)
opens the next bucket. So bucket 0 holds the first gradients backward produces, no parameter
straddles two buckets unless it exceeds one, and no bucket exceeds `cap`. (A cut at fixed offsets
would let a large early-layer parameter, whose gradient comes last, hold back every bucket it touches.)
With the parameter sizes unknown, one parameter of P elements gives the same rule: `cap`-sized
buckets from the end, the remainder last.

A bucket is ready once every parameter overlapping it has its gradient accumulated. Collectives over
one group must be issued in the same order on every rank, so bucket b is launched only once buckets
0..b-1 are: readiness is counted in the parameters' post-accumulate-grad hooks (plain Python
counters, no device sync) and the launched prefix grows as far as it is ready. A parameter that
receives no gradient (unused in the graph) never fires its hook; `finish` launches every bucket not
launched yet, in bucket order, and waits them all.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate

import torch

from dist_mtl.engine.comm import Pending


def bucket_ranges(sizes: Sequence[int], cap: int) -> list[tuple[int, int]]:
    """[start, end) of each bucket of the flat buffer of parameters of `sizes` elements (in parameter
    order), in launch order: bucket 0 at the buffer's end."""
    if cap < 1:
        raise ValueError(f"a bucket holds at least one element, got cap={cap}")
    ranges: list[tuple[int, int]] = []
    open_range: tuple[int, int] | None = None  # the bucket being filled
    ends = list(accumulate(sizes))
    for n, end in zip(reversed(sizes), reversed(ends), strict=True):
        if n == 0:
            continue
        start = end - n
        if open_range is not None and open_range[1] - start <= cap:
            open_range = (start, open_range[1])
            continue
        if open_range is not None:
            ranges.append(open_range)
        while end - start > cap:  # a parameter larger than a bucket
            ranges.append((end - cap, end))
            end -= cap
        open_range = (start, end)
    if open_range is not None:
        ranges.append(open_range)
    return ranges


def bucket_sizes(sizes: Sequence[int], cap: int) -> list[int]:
    """Elements per bucket, in launch order (what the byte model sums over)."""
    return [end - start for start, end in bucket_ranges(sizes, cap)]


def cap_elements(bucket_bytes: int, element_size: int) -> int:
    """Elements per bucket for engine.bucket_mb (at least one)."""
    return max(1, bucket_bytes // element_size)


class BucketPlan:
    """The buckets, which buckets each parameter overlaps, and how many parameters each waits for."""

    def __init__(self, sizes: Sequence[int], cap: int) -> None:
        self.ranges = bucket_ranges(sizes, cap)
        # Bucket starts in ascending buffer order, to find the buckets under a parameter.
        starts = [start for start, _ in reversed(self.ranges)]
        last = len(self.ranges) - 1
        self.members: list[list[int]] = []  # per parameter: the buckets it overlaps, in launch order
        self.waits = [0] * len(self.ranges)  # per bucket: parameters overlapping it
        offset = 0
        for n in sizes:
            buckets = []
            if n:
                low = bisect_right(starts, offset) - 1  # ascending index of its first element's bucket
                high = bisect_right(starts, offset + n - 1) - 1
                buckets = [last - i for i in range(high, low - 1, -1)]
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
