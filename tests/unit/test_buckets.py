"""The bucket partition of a flat gradient buffer and the launch rule of `BucketedAllReduce` (rep's
overlapped all-reduce): sizes from the end, ready buckets launched in bucket order only, every bucket
complete when launched, unused parameters' buckets launched by `finish`."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dist_mtl.engine.buckets import BucketedAllReduce, BucketPlan, bucket_ranges, bucket_sizes, cap_elements
from dist_mtl.engine.comm import Comm, Group, Pending
from dist_mtl.gradients import FlatGradBuffer

SOLO = Group("world", (0,), None)


def test_whole_parameters_in_reverse_order_within_the_cap() -> None:
    # Parameters of 3, 2, 4, 1 elements (offsets 0, 3, 5, 9), cap 5: from the end, [4, 1] fit (5),
    # 2 would make 7 (a new bucket), 3 would make 5 (joins it).
    assert bucket_ranges([3, 2, 4, 1], 5) == [(5, 10), (0, 5)]
    assert bucket_ranges([3, 2, 4, 1], 4) == [(9, 10), (5, 9), (3, 5), (0, 3)]
    assert bucket_ranges([3, 2, 4, 1], 100) == [(0, 10)]
    assert bucket_ranges([0, 2, 0], 1) == [(1, 2), (0, 1)]  # empty parameters are in no bucket
    assert bucket_ranges([], 4) == []
    with pytest.raises(ValueError, match="cap=0"):
        bucket_ranges([5], 0)


def test_a_parameter_larger_than_a_bucket_is_cut_from_its_end() -> None:
    # 9 elements (offsets 3..12) with a cap of 4: [8, 12), [4, 8), and its remainder [3, 4) opens the
    # next bucket, which the 3-element parameter before it joins; the last 2-element one sits alone.
    assert bucket_ranges([3, 9, 2], 4) == [(12, 14), (8, 12), (4, 8), (0, 4)]
    # Unknown sizes (P as one parameter): cap-sized buckets from the end, the remainder last.
    assert bucket_ranges([10], 4) == [(6, 10), (2, 6), (0, 2)]
    assert bucket_sizes([10], 4) == [4, 4, 2]


def test_partition_properties_on_random_sizes() -> None:
    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.randrange(0, 12) for _ in range(rng.randrange(1, 8))]
        cap = rng.randrange(1, 10)
        ranges = bucket_ranges(sizes, cap)
        total = sum(sizes)
        if not total:
            assert ranges == []
            continue
        # Contiguous, descending, covering the buffer, none above the cap.
        assert ranges[0][1] == total and ranges[-1][0] == 0
        assert all(a[0] == b[1] for a, b in itertools.pairwise(ranges))
        assert all(0 < e - s <= cap for s, e in ranges)
        starts = {s for s, _ in ranges}
        offsets = list(itertools.accumulate(sizes, initial=0))
        for n, offset in zip(sizes, offsets, strict=False):
            inside = {b for b in starts if offset < b < offset + n}
            if n <= cap:
                assert not inside  # a parameter within the cap is never split
            else:
                assert len(inside) == (n - 1) // cap  # cut into cap-sized pieces, no more
        # Greedy: a closed bucket that starts at a parameter boundary could not take the parameter
        # before it whole.
        for s, e in ranges[:-1]:
            if s in offsets:
                assert e - max(o for o in offsets if o < s) > cap
        plan = BucketPlan(sizes, cap)
        assert plan.ranges == ranges
        for n, offset, members in zip(sizes, offsets, plan.members, strict=False):
            want = [b for b, (s, e) in enumerate(ranges) if n and s < offset + n and offset < e]
            assert members == want  # exactly the buckets it overlaps, in launch order
        assert plan.waits == [sum(b in m for m in plan.members) for b in range(len(ranges))]


def test_cap_from_bytes() -> None:
    assert cap_elements(25 * 2**20, 4) == 25 * 2**18
    assert cap_elements(int(0.001 * 2**20), 4) == 262
    assert cap_elements(3, 4) == 1  # never an empty bucket


class Recorder:
    """A launch that records each bucket's offset and contents at launch time (a real collective over
    one rank moves nothing, so this is what the reducer hands the wrapper)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.launched: list[tuple[int, torch.Tensor]] = []
        self.comm = Comm(0, 1.0)

    def __call__(self, view: torch.Tensor) -> Pending:
        offset = (view.data_ptr() - self.buffer.data_ptr()) // view.element_size()
        self.launched.append((offset, view.clone()))
        return Pending(self.comm, "all-reduce", SOLO, None)


def test_ready_launches_the_ready_prefix_only_in_bucket_order() -> None:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 9, 2)]
    buffer = torch.zeros(14)
    rng = random.Random(1)
    for _ in range(50):
        rec = Recorder(buffer)
        reducer = BucketedAllReduce(params, buffer, 4, rec)
        reducer.arm()
        done: set[int] = set()
        order = list(range(3))
        rng.shuffle(order)
        for i in order:
            reducer.ready(i)
            done.add(i)
            launched = len(rec.launched)
            # Launched: the longest prefix of buckets whose every member is done.
            ready = [
                all(b not in m or j in done for j, m in enumerate(reducer.plan.members)) for b in range(4)
            ]
            prefix = next((b for b, r in enumerate(ready) if not r), 4)
            assert launched == prefix
        reducer.finish()
        assert [o for o, _ in rec.launched] == [12, 8, 4, 0]
        reducer.close()


def mlp_with_unused() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    unused = torch.nn.Parameter(torch.randn(7))  # in the buffer, never in the graph
    return net, [unused, *net.parameters()]


@pytest.mark.parametrize("cap", [1, 3, 8, 1000])
def test_buckets_launch_during_backward_complete_and_in_order(cap: int) -> None:
    net, params = mlp_with_unused()
    grads = FlatGradBuffer(params)
    rec = Recorder(grads.buffer)
    # Hooks run in registration order: this one sees the launches before the first layer's weight.
    hooks_seen = []
    net[0].weight.register_post_accumulate_grad_hook(lambda _: hooks_seen.append(len(rec.launched)))
    reducer = BucketedAllReduce(params, grads.buffer, cap, rec)
    x = torch.randn(3, 6)

    reducer.arm()
    net(x).square().sum().backward(inputs=params)
    during = len(rec.launched)
    reducer.finish()
    reducer.close()

    ranges = bucket_ranges([p.numel() for p in params], cap)
    assert [o for o, _ in rec.launched] == [s for s, _ in ranges]  # every bucket once, in order
    for (_, snapshot), (s, e) in zip(rec.launched, ranges, strict=True):
        assert torch.equal(snapshot, grads.buffer[s:e])  # nothing arrived after its launch
    # The unused parameter sits at the front, so the last bucket waits for `finish`; with more than
    # one bucket some launch inside the backward.
    assert during < len(ranges)
    if len(ranges) > 2:
        assert during > 0 and hooks_seen[0] > 0  # buckets were out before the first layer's gradient


def test_hooks_do_nothing_unarmed_and_nothing_after_close() -> None:
    net, params = mlp_with_unused()
    grads = FlatGradBuffer(params)
    rec = Recorder(grads.buffer)
    reducer = BucketedAllReduce(params, grads.buffer, 4, rec)
    net(torch.randn(2, 6)).sum().backward(inputs=params)
    assert rec.launched == []
    reducer.close()
    reducer.arm()
    net(torch.randn(2, 6)).sum().backward(inputs=params)
    assert rec.launched == []  # hooks removed
