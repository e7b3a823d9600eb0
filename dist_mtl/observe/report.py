"""`dist-mtl profile RUN_DIR`: where each rank's step time and traffic go, from the per-rank JSONL files.

`rank_files`, `read_steps` and `skip_warmup` are also the readers of `dist-mtl report`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dist_mtl.observe.recorder import PHASES

_RANK_FILE = re.compile(r"rank(\d+)\.jsonl")
_STEP_KEY = "time/step"
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def profile_report(run_dir: str | Path, *, warmup: int = 2) -> str:
    """Summarise RUN_DIR/metrics/rank{N}.jsonl per rank, skipping `warmup` steps after every (re)start.

    A (re)start is recognised where the record's "restart" index changes (a resumed run cuts the file
    at its checkpoint's step and appends) or, in older logs, where the step counter does not increase.
    Lines without "time/step" (evaluation records, for instance) are not steps and are ignored.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    metrics_dir = Path(run_dir) / "metrics"
    files = rank_files(metrics_dir)
    if not files:
        raise FileNotFoundError(f"no per-rank metrics files (rank<N>.jsonl) in {metrics_dir}")
    sections = [f"profile of {run_dir} (first {warmup} steps after each start skipped)"]
    for rank, path in files:
        records = skip_warmup(read_steps(path), warmup)
        sections.append(_format_rank(rank, records, warmup))
    return "\n\n".join(sections) + "\n"


def rank_files(metrics_dir: Path) -> list[tuple[int, Path]]:
    """(rank, path) of every metrics/rank<N>.jsonl, by rank; empty when the directory is missing."""
    if not metrics_dir.is_dir():
        return []
    found = []
    for path in metrics_dir.glob("rank*.jsonl"):
        match = _RANK_FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_steps(path: Path) -> list[dict[str, float]]:
    """Step records in file order; any line that is not a JSON object with a "step" is an error."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}, line {number}: expected a JSON object with a 'step' key")
            if _STEP_KEY in record:
                records.append(record)
    return records


def skip_warmup(records: Sequence[dict[str, float]], warmup: int) -> list[dict[str, float]]:
    """Drop the first `warmup` records after every (re)start: compilation and allocator warm-up."""
    kept = []
    since_start = 0
    previous: dict[str, float] | None = None
    for record in records:
        if previous is not None and (
            record["step"] <= previous["step"] or record.get("restart", 0) != previous.get("restart", 0)
        ):
            since_start = 0
        previous = record
        since_start += 1
        if since_start > warmup:
            kept.append(record)
    return kept


def _column(records: Sequence[dict[str, float]], key: str) -> np.ndarray:
    return np.array([float(record.get(key, 0.0)) for record in records])


def _ms(values: np.ndarray) -> str:
    p50, p95 = np.percentile(values, [50, 95]) * 1e3
    return f"{p50:>10.3f} {p95:>10.3f}"


def _share(values: np.ndarray, step_mean: float) -> str:
    return f"{100.0 * values.mean() / step_mean:>7.1f}%" if step_mean > 0 else f"{'-':>8}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    exponent = 0
    while value >= 1024 and exponent < len(_BYTE_UNITS) - 1:
        value /= 1024
        exponent += 1
    return f"{value:.0f} B" if exponent == 0 else f"{value:.2f} {_BYTE_UNITS[exponent]}"


def _mean_bytes(records: Sequence[dict[str, float]], key: str) -> float | None:
    """Mean per step, counting steps without the key as zero; None when no step had traffic there."""
    if not any(key in record for record in records):
        return None
    return float(_column(records, key).mean())


def _row(label: str, times: np.ndarray, step_mean: float, sent: float | None, recv: float | None) -> str:
    return f"{label:<10} {_ms(times)} {_share(times, step_mean)} {_bytes(sent):>12} {_bytes(recv):>12}"


def _format_rank(rank: int, records: Sequence[dict[str, float]], warmup: int) -> str:
    if not records:
        return f"rank {rank}: no steps left after skipping {warmup} warm-up steps"
    step = _column(records, _STEP_KEY)
    step_mean = float(step.mean())
    header = f"{'phase':<10} {'p50 ms':>10} {'p95 ms':>10} {'share':>8} {'sent/step':>12} {'recv/step':>12}"
    lines = [f"rank {rank}: steps measured: {len(records)}", header]
    accounted = np.zeros_like(step)
    for name in PHASES:
        times = _column(records, f"time/{name}")
        accounted += times
        sent = _mean_bytes(records, f"bytes_sent/{name}")
        recv = _mean_bytes(records, f"bytes_recv/{name}")
        lines.append(_row(name, times, step_mean, sent, recv))
    lines.append(_row("(other)", step - accounted, step_mean, None, None))
    total_sent = _mean_bytes(records, "bytes_sent/total")
    total_recv = _mean_bytes(records, "bytes_recv/total")
    lines.append(_row("step", step, step_mean, total_sent, total_recv))
    comm = _column(records, "comm_seconds/total")
    comm_share = _share(comm, step_mean).strip()
    lines.append(f"inside collectives: {1e3 * comm.mean():.3f} ms per step ({comm_share} of the step)")
    if any("solver/seconds" in record for record in records):
        solver = np.array([r["solver/seconds"] for r in records if "solver/seconds" in r])
        p50, p95 = np.percentile(solver, [50, 95]) * 1e3
        lines.append(f"solver: p50 {p50:.3f} ms, p95 {p95:.3f} ms over {solver.size} solves")
    if any("solver/iterations" in record for record in records):
        iterations = np.array([r["solver/iterations"] for r in records if "solver/iterations" in r])
        lines.append(f"solver iterations: mean {iterations.mean():.1f}, max {iterations.max():.0f}")
    return "\n".join(lines)


def phase_means(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of every phase, plus "(other)": the step time no phase accounts for."""
    step = _column(records, _STEP_KEY)
    means = {}
    accounted = np.zeros_like(step)
    for name in PHASES:
        times = _column(records, f"time/{name}")
        accounted += times
        means[name] = float(times.mean()) if times.size else 0.0
    means["(other)"] = float(np.clip(step - accounted, 0.0, None).mean()) if step.size else 0.0
    return means
