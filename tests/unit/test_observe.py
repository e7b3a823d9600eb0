"""Unit tests for dist_mtl.observe: recorder accounting, sinks, profile report and profiler window."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_mtl.observe import (
    PHASES,
    JsonlSink,
    MetricSink,
    MultiSink,
    ProfilerWindow,
    StepRecorder,
    TensorBoardSink,
    profile_report,
)


class FakeClock:
    """A clock the test moves by hand, so phase accounting can be checked to the exact number."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- StepRecorder -------------------------------------------------------------------------------------


def test_nested_and_reentered_phases_are_exclusive_and_add_up() -> None:
    clock = FakeClock()
    rec = StepRecorder(clock=clock)
    with rec.phase("data"):
        clock.now = 1.0
    with rec.phase("backward"):
        clock.now = 3.0
        with rec.phase("exchange"):
            clock.now = 4.5
        clock.now = 5.0
    with rec.phase("data"):
        clock.now = 5.25
    clock.now = 6.0
    record = rec.end_step(0)

    assert record["step"] == 0
    assert record["time/data"] == pytest.approx(1.25)
    assert record["time/backward"] == pytest.approx(2.5)  # the nested exchange is not counted twice
    assert record["time/exchange"] == pytest.approx(1.5)
    assert record["time/step"] == pytest.approx(6.0)
    assert {key for key in record if key.startswith("time/")} == {f"time/{p}" for p in PHASES} | {"time/step"}
    assert all(record[f"time/{p}"] == 0.0 for p in ("forward", "solve", "apply", "optimizer"))

    clock.now = 7.0
    second = rec.end_step(1)
    assert second["time/step"] == pytest.approx(1.0)
    assert all(second[f"time/{p}"] == 0.0 for p in PHASES)


def test_real_clock_phase_times_respect_sleeps_and_fit_in_the_step() -> None:
    rec = StepRecorder()
    for _ in range(2):
        with rec.phase("forward"):
            time.sleep(0.01)
    with rec.phase("backward"):
        time.sleep(0.005)
        with rec.phase("exchange"):
            time.sleep(0.005)
    record = rec.end_step(3)
    assert record["time/forward"] >= 0.02
    assert record["time/backward"] >= 0.005
    assert record["time/exchange"] >= 0.005
    assert sum(record[f"time/{p}"] for p in PHASES) <= record["time/step"]


def test_unknown_phase_is_rejected_with_the_valid_names() -> None:
    rec = StepRecorder()
    with pytest.raises(ValueError, match="forward.*optimizer"), rec.phase("fwd"):
        pass
    with pytest.raises(ValueError, match="unknown phase"):
        rec.add_bytes(1, 1, phase="fwd")


def test_current_phase_tracks_the_innermost_open_phase_even_on_errors() -> None:
    rec = StepRecorder()
    assert rec.current_phase is None
    with rec.phase("backward"):
        assert rec.current_phase == "backward"
        with pytest.raises(KeyError), rec.phase("exchange"):
            assert rec.current_phase == "exchange"
            raise KeyError("boom")
        assert rec.current_phase == "backward"
    assert rec.current_phase is None
    rec.end_step(0)


def test_bytes_go_to_the_named_then_open_then_exchange_phase_and_reset() -> None:
    rec = StepRecorder()
    with rec.phase("backward"):
        rec.add_bytes(100, 10, seconds=0.5)
        rec.add_bytes(5, 5, phase="apply", seconds=0.25)
    rec.add_bytes(1000, 2000)
    with rec.phase("exchange"):
        rec.add_bytes(1, 2)
    record = rec.end_step(0)

    assert (record["bytes_sent/backward"], record["bytes_recv/backward"]) == (100, 10)
    assert (record["bytes_sent/apply"], record["bytes_recv/apply"]) == (5, 5)
    assert (record["bytes_sent/exchange"], record["bytes_recv/exchange"]) == (1001, 2002)
    assert "bytes_sent/forward" not in record
    assert (record["bytes_sent/total"], record["bytes_recv/total"]) == (1106, 2017)
    assert record["comm_seconds/total"] == pytest.approx(0.75)

    empty = rec.end_step(1)
    assert not any(key.startswith("bytes_sent/") and key != "bytes_sent/total" for key in empty)
    assert (empty["bytes_sent/total"], empty["bytes_recv/total"], empty["comm_seconds/total"]) == (0, 0, 0)


def test_end_step_inside_an_open_phase_is_an_error() -> None:
    rec = StepRecorder()
    with pytest.raises(RuntimeError, match="optimizer"), rec.phase("optimizer"):
        rec.end_step(0)


def test_sync_runs_at_every_boundary_only_when_given() -> None:
    calls = []
    rec = StepRecorder(sync=lambda: calls.append(1))
    assert len(calls) == 1  # the step clock starts synchronised
    with rec.phase("forward"), rec.phase("backward"):
        pass
    assert len(calls) == 5
    rec.end_step(0)
    assert len(calls) == 6


# --- sinks --------------------------------------------------------------------------------------------


def test_jsonl_sink_round_trips_and_appends_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics" / "rank0.jsonl"
    sink = JsonlSink(path)
    assert isinstance(sink, MetricSink)
    sink.write(0, {"step": 0, "time/step": 0.5, "loss": 1.25})
    sink.write(1, {"time/step": 0.25})
    assert len(path.read_text().splitlines()) == 2  # line-buffered: on disk before close
    sink.close()
    resumed = JsonlSink(path)
    resumed.write(2, {"loss": float("nan")})
    resumed.close()

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[:2] == [{"step": 0, "time/step": 0.5, "loss": 1.25}, {"step": 1, "time/step": 0.25}]
    assert rows[2]["step"] == 2 and rows[2]["loss"] != rows[2]["loss"]


def test_tensorboard_sink_writes_readable_scalars(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    for step in range(3):
        sink.write(step, {"step": step, "time/forward": 0.5 * step, "loss/0": 10.0 - step})
    sink.close()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"time/forward", "loss/0"}
    forward = events.Scalars("time/forward")
    assert [e.step for e in forward] == [0, 1, 2]
    assert [e.value for e in forward] == pytest.approx([0.0, 0.5, 1.0])
    assert [e.value for e in events.Scalars("loss/0")] == pytest.approx([10.0, 9.0, 8.0])


class _ListSink:
    def __init__(self, fail_on_close: bool = False) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.closed = False
        self.fail_on_close = fail_on_close

    def write(self, step: int, values: dict[str, float]) -> None:
        self.rows.append((step, dict(values)))

    def close(self) -> None:
        self.closed = True
        if self.fail_on_close:
            raise OSError("disk full")


def test_multi_sink_fans_out_and_closes_every_sink_even_if_one_fails() -> None:
    first, second = _ListSink(fail_on_close=True), _ListSink()
    multi = MultiSink([first, second])
    multi.write(4, {"loss": 1.0})
    assert first.rows == second.rows == [(4, {"loss": 1.0})]
    with pytest.raises(OSError, match="disk full"):
        multi.close()
    assert first.closed and second.closed


# --- profile_report -----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _rank_rows(text: str, rank: int) -> dict[str, list[str]]:
    """The report's table for one rank, as {first token: remaining tokens}."""
    section = next(s for s in text.split("\n\n") if s.startswith(f"rank {rank}:"))
    return {line.split()[0]: line.split()[1:] for line in section.splitlines()[1:]}


def _synthetic_rank0() -> list[dict[str, float]]:
    warm = [{"step": s, "time/step": 1.0, "time/forward": 0.9} for s in (0, 1)]
    forward_ms = [1.0, 2.0, 3.0, 4.0]
    step_ms = [10.0, 10.0, 20.0, 20.0]
    steady = []
    for i, (fwd, total) in enumerate(zip(forward_ms, step_ms, strict=True)):
        row = {"step": i + 2, "time/step": total / 1e3, "time/forward": fwd / 1e3, "time/data": 0.001}
        row |= {"bytes_sent/exchange": 1024.0, "bytes_sent/total": 1024.0, "comm_seconds/total": 0.003}
        if i < 2:
            row |= {"bytes_recv/exchange": 3072.0, "bytes_recv/total": 3072.0}
            row |= {"solver/seconds": 0.001 + 0.002 * i, "solver/iterations": 4.0 + 6.0 * i}
        steady.append(row)
    return warm + steady


def test_profile_report_numbers_match_hand_computed_values(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    _write_jsonl(metrics / "rank0.jsonl", _synthetic_rank0())
    for rank in (2, 10):
        _write_jsonl(metrics / f"rank{rank}.jsonl", [{"step": s, "time/step": 0.01} for s in range(3)])
    (metrics / "ranks.jsonl").write_text("not a rank file\n")

    text = profile_report(tmp_path)
    assert text.index("rank 0:") < text.index("rank 2:") < text.index("rank 10:")  # numeric order
    assert "rank 0: steps measured: 4" in text and "rank 2: steps measured: 1" in text

    rows = _rank_rows(text, 0)
    # forward ms [1, 2, 3, 4]: p50 2.5, p95 3 + 0.85 = 3.85; share 2.5 / mean step 15 ms.
    assert rows["forward"] == ["2.500", "3.850", "16.7%", "-", "-"]
    # step ms [10, 10, 20, 20]: p50 15, p95 20; exchange sent 1 KiB every step, received 3 KiB on half.
    assert rows["step"] == ["15.000", "20.000", "100.0%", "1.00", "KiB", "1.50", "KiB"]
    assert rows["exchange"] == ["0.000", "0.000", "0.0%", "1.00", "KiB", "1.50", "KiB"]
    # unaccounted time per step: step - forward - data = [8, 7, 16, 15] ms -> p50 11.5.
    assert rows["(other)"][:3] == ["11.500", "15.850", "76.7%"]
    assert set(PHASES) <= set(rows)
    assert "inside collectives: 3.000 ms per step (20.0% of the step)" in text
    assert "solver: p50 2.000 ms, p95 2.900 ms over 2 solves" in text
    assert "solver iterations: mean 7.0, max 10" in text
    assert "solver" not in text.split("rank 2:")[1]

    no_warmup = _rank_rows(profile_report(tmp_path, warmup=0), 0)
    assert no_warmup["forward"][1] == "900.000"  # the warm-up steps are back in


def test_profile_report_restarts_warmup_on_resume_and_ignores_non_step_records(tmp_path: Path) -> None:
    first_run = [{"step": s, "time/step": 0.01} for s in range(4)]
    resumed = [{"step": s, "time/step": 0.01} for s in range(2, 6)]
    evaluation = {"step": 3, "eval/accuracy": 0.9}
    _write_jsonl(tmp_path / "metrics" / "rank0.jsonl", [*first_run[:3], evaluation, first_run[3], *resumed])
    # warm-up 1 after each start: first run keeps steps 1..3, the resumed run keeps 3..5.
    assert "rank 0: steps measured: 6" in profile_report(tmp_path, warmup=1)
    assert "no steps left after skipping 4 warm-up steps" in profile_report(tmp_path, warmup=4)


def test_profile_report_without_metrics_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics")):
        profile_report(tmp_path)


@pytest.mark.parametrize("bad_line", ["{not json", "[1, 2]", '{"time/step": 0.1}'])
def test_profile_report_names_file_and_line_of_a_malformed_record(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "metrics" / "rank1.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 0, "time/step": 0.1}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=r"rank1\.jsonl, line 3"):
        profile_report(tmp_path)


# --- ProfilerWindow -----------------------------------------------------------------------------------


def _profiled_steps(window: ProfilerWindow, phases: list[str]) -> None:
    rec = StepRecorder()
    x = torch.randn(16, 16)
    with window:
        for step, name in enumerate(phases):
            with rec.phase(name):
                x = torch.tanh(x @ x)
            rec.end_step(step)
            window.step()


def test_profiler_window_traces_only_the_window_steps_with_phase_ranges(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    _profiled_steps(
        ProfilerWindow(out, start_step=1, num_steps=2, enabled=True),
        ["data", "forward", "forward", "optimizer"],
    )
    trace = (out / "trace.json").read_text()
    assert "phase/forward" in trace
    assert "phase/data" not in trace and "phase/optimizer" not in trace
    assert "phase/forward" in (out / "key_averages.txt").read_text()


def test_disabled_profiler_window_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    _profiled_steps(ProfilerWindow(out, start_step=0, num_steps=1, enabled=False), ["forward"])
    assert not out.exists()


def test_profiler_window_rejects_an_empty_window(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        ProfilerWindow(tmp_path, start_step=0, num_steps=0, enabled=True)
