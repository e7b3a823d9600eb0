"""A torch.profiler window over a few training steps, cheap enough to leave in every run's code path."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch
from torch.profiler import ProfilerActivity, profile, schedule

TRACE_FILE = "trace.json"
TABLE_FILE = "key_averages.txt"


class ProfilerWindow:
    """Records steps [start_step, start_step + num_steps) and writes a Chrome trace and an op table.

    Steps are counted in calls to `step()` since the window was entered, so call it once at the end of
    every training step. The step before the window (when there is one) is a profiler warm-up step,
    which torch discards, so that start-up cost does not pollute the first recorded step. Phases timed
    by `StepRecorder` show up in the trace as ranges named `phase/<name>`.

    Files (written when the window closes, or when the context exits inside the window):
    out_dir/trace.json (open in https://ui.perfetto.dev or chrome://tracing) and out_dir/key_averages.txt.
    Disabled windows do nothing at all.
    """

    def __init__(self, out_dir: str | Path, start_step: int, num_steps: int, enabled: bool) -> None:
        if start_step < 0 or num_steps < 1:
            raise ValueError(f"need start_step >= 0 and num_steps >= 1, got {start_step} and {num_steps}")
        self.out_dir = Path(out_dir)
        self.start_step = start_step
        self.num_steps = num_steps
        self.enabled = enabled
        self._profile: profile | None = None

    def __enter__(self) -> ProfilerWindow:
        if self.enabled:
            warmup = min(1, self.start_step)
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(
                activities=activities,
                schedule=schedule(
                    wait=self.start_step - warmup, warmup=warmup, active=self.num_steps, repeat=1
                ),
                on_trace_ready=self._write,
            )
            self._profile.__enter__()
        return self

    def step(self) -> None:
        """Mark the end of one training step."""
        if self._profile is not None:
            self._profile.step()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._profile is not None:
            self._profile.__exit__(exc_type, exc, tb)
            self._profile = None

    def _write(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / TRACE_FILE))
        sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=50)
        (self.out_dir / TABLE_FILE).write_text(table + "\n", encoding="utf-8")
