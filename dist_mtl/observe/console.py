"""Rank-aware printing: on many ranks, only rank 0 talks to the terminal."""

from __future__ import annotations


def rank_zero_print(*args: object, rank: int) -> None:
    """Print (and flush, so lines interleave sanely with other ranks' logs) only on rank 0."""
    if rank == 0:
        print(*args, flush=True)
