"""Per-task chains of asynchronous collectives, advanced between backward passes (engine.overlap).

An owned task's exchange is a chain of stages: each stage launches one collective and returns its
`Pending`, or does local work (accumulating Gramian rows, say) and returns None. A chain starts when
its task's backward ends; `advance` (called after every later backward) moves each chain on as far
as its collectives have already finished, without blocking; `drain` finishes them all.

Collectives of one process group must be issued in the same order on every rank. Stage s of every
chain uses the same group, and a chain moves on only when every earlier chain has moved past stage s,
so stage s is launched in task order on every rank whatever the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dist_mtl.engine.comm import Pending

Stage = Callable[[], Pending | None]


class _Chain:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.next = 0  # index of the next stage to launch
        self.pending: Pending | None = None

    def run(self, bound: float, block: bool) -> None:
        """Launch stages while the one in flight has finished (or, with `block`, after waiting for
        it) and the next one's index is below `bound`."""
        while True:
            if self.pending is not None:
                if not block and not self.pending.done():
                    return
                self.pending.wait()
                self.pending = None
            if self.next >= len(self.stages) or self.next >= bound:
                return
            self.pending = self.stages[self.next]()
            self.next += 1


class TaskPipeline:
    """The chains of one step, in task order."""

    def __init__(self) -> None:
        self.chains: list[_Chain] = []

    def start(self, stages: Sequence[Stage]) -> None:
        """Begin a task's chain (its first stage is launched now if the order allows) and move the
        others on."""
        self.chains.append(_Chain(stages))
        self._move(block=False)

    def advance(self) -> None:
        """Launch every stage whose predecessor has finished, without blocking."""
        self._move(block=False)

    def drain(self) -> None:
        """Run every chain to its end (blocking), then forget them for the next step."""
        self._move(block=True)
        self.chains.clear()

    def _move(self, block: bool) -> None:
        # One pass in task order: a chain may launch stage s only once every earlier chain has.
        bound = float("inf")
        for chain in self.chains:
            chain.run(bound, block)
            bound = min(bound, chain.next)
