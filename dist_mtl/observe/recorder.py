"""Per-step phase timers and communication accounting.

One `StepRecorder` lives on every rank. The training step wraps its phases in `rec.phase(name)`, the
collective wrapper reports traffic through `add_bytes`, and `end_step` turns it all into one flat
record for the metric sinks (the trainer adds losses, weights and solver diagnostics to it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.profiler import record_function

PHASES: tuple[str, ...] = ("data", "forward", "backward", "exchange", "solve", "apply", "optimizer")


def _check_phase(name: str) -> None:
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; expected one of {', '.join(PHASES)}")


class StepRecorder:
    """Accumulates one training step's phase times, bytes and scalars until `end_step`.

    Time is *exclusive*: while phases are nested, the clock runs only for the innermost one, so the
    phase times of a step never add up to more than the step time and their shares are comparable.
    Entering the same phase several times in a step adds the pieces up.

    `sync` (for example `torch.cuda.synchronize`) is called at every phase boundary and at `end_step`
    so that asynchronous device work lands in the phase that launched it. It serialises the host with
    the device and therefore removes the overlap it measures; leave it off except for profiling runs.
    `clock` exists so tests can drive time deterministically.
    """

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._sync = sync
        self._clock = clock
        self._stack: list[str] = []
        self._step_start = self._now()
        self._mark = self._step_start
        self._reset()

    def _reset(self) -> None:
        self._times = dict.fromkeys(PHASES, 0.0)
        self._sent: dict[str, int] = {}
        self._recv: dict[str, int] = {}
        self._comm_seconds = 0.0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()

    def _charge_innermost(self, now: float) -> None:
        """Give the time since the last boundary to the innermost open phase."""
        if self._stack:
            self._times[self._stack[-1]] += now - self._mark
        self._mark = now

    @property
    def current_phase(self) -> str | None:
        """The innermost open phase, or None between phases."""
        return self._stack[-1] if self._stack else None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as `name` and mark it as `phase/<name>` in torch.profiler traces."""
        _check_phase(name)
        with record_function(f"phase/{name}"):
            self._charge_innermost(self._now())
            self._stack.append(name)
            try:
                yield
            finally:
                self._charge_innermost(self._now())
                self._stack.pop()

    def add_bytes(self, sent: int, received: int, phase: str | None = None, seconds: float = 0.0) -> None:
        """Account one collective's traffic to `phase`, else the open phase, else "exchange"."""
        target = phase if phase is not None else (self.current_phase or "exchange")
        _check_phase(target)
        self._sent[target] = self._sent.get(target, 0) + int(sent)
        self._recv[target] = self._recv.get(target, 0) + int(received)
        self._comm_seconds += float(seconds)

    def add_comm_seconds(self, seconds: float) -> None:
        """Time spent blocked on a collective launched earlier (its bytes were accounted at launch)."""
        self._comm_seconds += float(seconds)

    def end_step(self, step: int) -> dict[str, float]:
        """Close the step: return its flat record and start the next one from zero."""
        if self._stack:
            raise RuntimeError(f"end_step({step}) called inside open phases {self._stack}")
        now = self._now()
        record: dict[str, float] = {"step": step}
        record.update({f"time/{name}": seconds for name, seconds in self._times.items()})
        record["time/step"] = now - self._step_start
        for name in PHASES:
            if name in self._sent:
                record[f"bytes_sent/{name}"] = float(self._sent[name])
                record[f"bytes_recv/{name}"] = float(self._recv[name])
        record["bytes_sent/total"] = float(sum(self._sent.values()))
        record["bytes_recv/total"] = float(sum(self._recv.values()))
        record["comm_seconds/total"] = self._comm_seconds
        self._step_start = now
        self._mark = now
        self._reset()
        return record
