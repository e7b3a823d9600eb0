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


def test_ranges_cover_the_buffer_from_its_end_with_the_remainder_last() -> None:
    assert bucket_ranges(10, 4) == [(6, 10), (2, 6), (0, 2)]
    assert bucket_ranges(8, 4) == [(4, 8), (0, 4)]
    assert bucket_ranges(3, 100) == [(0, 3)]
    assert bucket_ranges(0, 4) == []
    for numel, cap in itertools.product(range(1, 40), range(1, 12)):
        ranges = bucket_ranges(numel, cap)
        assert ranges[0][1] == numel and ranges[-1][0] == 0
        assert all(a[0] == b[1] for a, b in itertools.pairwise(ranges))  # contiguous, descending
        assert all(s == cap for s in bucket_sizes(numel, cap)[:-1])
        assert sum(bucket_sizes(numel, cap)) == numel
    with pytest.raises(ValueError, match="cap=0"):
        bucket_ranges(5, 0)


def test_cap_from_bytes() -> None:
    assert cap_elements(25 * 2**20, 4) == 25 * 2**18
    assert cap_elements(int(0.001 * 2**20), 4) == 262
    assert cap_elements(3, 4) == 1  # never an empty bucket


def test_plan_members_and_a_parameter_larger_than_a_bucket() -> None:
    # Parameters of 3, 9 (larger than the cap of 4) and 2 elements: a flat buffer of 14,
    # buckets [10, 14), [6, 10), [2, 6), [0, 2).
    plan = BucketPlan([3, 9, 2], 4)
    assert plan.ranges == [(10, 14), (6, 10), (2, 6), (0, 2)]
    assert plan.members == [[2, 3], [0, 1, 2], [0]]
    assert plan.waits == [2, 1, 2, 1]
    # Brute force on random sizes: a parameter is a member of exactly the buckets it overlaps.
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randrange(0, 7) for _ in range(rng.randrange(1, 6))]
        cap = rng.randrange(1, 9)
        plan = BucketPlan(sizes, cap)
        offset = 0
        for n, members in zip(sizes, plan.members, strict=True):
            want = [b for b, (s, e) in enumerate(plan.ranges) if n and s < offset + n and offset < e]
            assert members == want
            offset += n


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
        assert [o for o, _ in rec.launched] == [10, 6, 2, 0]
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
    reducer = BucketedAllReduce(params, grads.buffer, cap, rec)
    x = torch.randn(3, 6)

    hooks_seen = []
    net[0].weight.register_post_accumulate_grad_hook(lambda _: hooks_seen.append(len(rec.launched)))

    reducer.arm()
    net(x).square().sum().backward(inputs=params)
    during = len(rec.launched)
    reducer.finish()
    reducer.close()

    ranges = bucket_ranges(grads.numel, cap)
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
