"""The gramian protocol's overlap chunks: which parameters feed which chunk of every shard.

A chunk's round may leave only once every parameter overlapping any of its K ranges has its gradient,
so `chunk_cover` must list, for each parameter, exactly the chunks it touches: checked against a
brute force over every element, including parameters that straddle shards and a padded last shard.
"""

from __future__ import annotations

import random

import pytest

from dist_mtl.engine.protocols.gramian import chunk_cover
from dist_mtl.engine.shard_optimizer import shard_numel


def brute_force(sizes: list[int], k_size: int, shard: int, chunks: int) -> list[list[int]]:
    chunk, owner, offset = shard // chunks, [], 0
    for n in sizes:
        owner.append(sorted({(e % shard) // chunk for e in range(offset, offset + n)}))
        offset += n
    return owner


@pytest.mark.parametrize("seed", range(20))
def test_chunk_cover_matches_every_element(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
    k_size, chunks, replicas = rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 3)
    shard = shard_numel(sum(sizes), k_size, replicas, True, chunks)
    assert shard % (chunks * replicas) == 0 and k_size * shard >= sum(sizes)
    assert chunk_cover(sizes, k_size, shard, chunks) == brute_force(sizes, k_size, shard, chunks)


def ready_after_each_gradient(sizes: list[int], k_size: int, chunks: int) -> list[list[int]]:
    """Backward produces the parameters last to first; after each one, the chunks now complete."""
    shard = shard_numel(sum(sizes), k_size, 1, False, chunks)
    cover = chunk_cover(sizes, k_size, shard, chunks)
    waiting = [sum(c in cs for cs in cover) for c in range(chunks)]
    ready = []
    for index in reversed(range(len(sizes))):
        for c in cover[index]:
            waiting[c] -= 1
        ready.append([c for c in range(chunks) if waiting[c] == 0])
    return ready


def test_rounds_can_leave_while_the_backward_runs_when_later_layers_hold_the_parameters() -> None:
    """A CNN-like stack (the last layers hold most parameters), K = 2, 4 chunks: S = 42,500, s = 10,625.
    The last layer alone covers chunks 2 and 3 of shard 0 and all of shard 1, so those two rounds leave
    right after its gradient, chunk 1 after the third layer's; only chunk 0 waits for the first layers."""
    assert ready_after_each_gradient([1000, 4000, 16000, 64000], 2, 4) == [
        [2, 3],
        [1, 2, 3],
        [1, 2, 3],
        [0, 1, 2, 3],
    ]


def test_nothing_leaves_early_when_the_first_layer_holds_most_parameters() -> None:
    """An MLP whose first layer holds 80 % of the parameters (bench/step.py's): shard 0 lies inside it,
    and its gradient comes last, so every chunk waits for the end of the backward (only the rounds of
    earlier tasks overlap; see the README)."""
    assert ready_after_each_gradient([80000, 15000, 5000], 2, 4) == [[], [], [0, 1, 2, 3]]
