"""Destinations for per-step records: TensorBoard for people, JSONL for `dist-mtl profile` and scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class MetricSink(Protocol):
    """Anything that accepts one flat record per step and can be closed."""

    def write(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """One scalar per key, with the record's step as the global step.

    `purge_step` (a resumed run: its checkpoint's step + 1) makes TensorBoard hide the events the
    interrupted run wrote at or after that step, so each step is shown once.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        # Imported here: loading tensorboard costs about a second that `dist-mtl profile` need not pay.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if key != "step":
                self._writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class JsonlSink:
    """One JSON object per line; appends, so a resumed run continues the same file (cut at its step)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line buffering: every finished step is on disk even if the job is killed right after.
        self._file = path.open("a", buffering=1, encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{key: float(value) for key, value in values.items() if key != "step"}}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class MultiSink:
    """Fans every record out to several sinks; closing closes all of them even if one fails."""

    def __init__(self, sinks: Sequence[MetricSink]) -> None:
        self._sinks = tuple(sinks)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for sink in self._sinks:
            sink.write(step, values)

    def close(self) -> None:
        with ExitStack() as stack:
            for sink in reversed(self._sinks):
                stack.callback(sink.close)
