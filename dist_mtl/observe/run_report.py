"""`dist-mtl report RUN_DIR [RUN_DIR ...]`: figures and one Markdown summary of one or several runs.

Reads what a run directory holds (summary.json, metrics/rank<N>.jsonl, gramians/step_*.npy) and
draws: test error per task across the runs, task weights over training, the step-time breakdown per
phase and rank, and the gradient-cosine heatmap at one logged step. An input a run lacks (no
Gramians, no summary yet) skips that figure with a line in report.md saying why; a directory that
is no run at all is a RunDirError. `run_figures` + `log_figures` put the same figures in TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_mtl.argtypes import int_at_least
from dist_mtl.errors import RunDirError
from dist_mtl.metrics import average_error, task_error
from dist_mtl.observe.gramians import GRAMIAN_DIR, gradient_cosines, gramian_steps
from dist_mtl.observe.report import phase_means, rank_files, read_steps, skip_warmup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"
FIGURES = ("task_error", "task_weights", "step_time", "gradient_cosine")
_TITLES = {
    "task_error": "test error per task",
    "task_weights": "task weights",
    "step_time": "step time per phase and rank",
    "gradient_cosine": "gradient cosines",
}


def _plots() -> ModuleType:
    """The figure builders, imported on first use: matplotlib adds ~0.6 s to the start-up of every
    `dist-mtl` command (the CLI builds this module's parser), and only drawing needs it."""
    from dist_mtl.observe import plots

    return plots


@dataclass
class RunData:
    """What `report` reads from one run directory (records are the step records of each rank)."""

    path: Path
    summary: dict[str, Any] | None
    records: dict[int, list[dict[str, float]]]
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        """Task order as trained: summary.json's, else the order of the logged weights."""
        if self.summary and isinstance(self.summary.get("tasks"), dict):
            return list(self.summary["tasks"])
        for records in self.records.values():
            for record in records:
                names = [key.removeprefix("weight/") for key in record if key.startswith("weight/")]
                if names:
                    return names
        return []


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; RunDirError when it is not one or its files are malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a run directory: no such directory")
    summary_path = path / "summary.json"
    files = rank_files(path / "metrics")
    if not summary_path.is_file() and not files:
        raise RunDirError(
            f"{path} is not a run directory: it has neither summary.json nor metrics/rank<N>.jsonl"
        )
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{summary_path}: not valid JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise RunDirError(f"{summary_path}: expected a JSON object")
    records = {}
    for rank, file in files:
        try:
            records[rank] = read_steps(file)
        except ValueError as exc:  # names the file and line
            raise RunDirError(str(exc)) from None
    return RunData(path=path, summary=summary, records=records, name=path.resolve().name or str(path))


def _errors(run: RunData) -> dict[str, float | None]:
    tasks = (run.summary or {}).get("tasks") or {}
    return {name: task_error(m) if isinstance(m, dict) else None for name, m in tasks.items()}


def _weights_figure(run: RunData) -> Figure | str:
    source = next(
        (
            recs
            for _, recs in sorted(run.records.items())
            if any(k.startswith("weight/") for r in recs for k in r)
        ),
        None,
    )
    if source is None:
        return "no task weights in metrics/rank<N>.jsonl (observe.jsonl off, or no logged step)"
    by_step = {int(r["step"]): r for r in source if any(k.startswith("weight/") for k in r)}  # a rerun wins
    steps = sorted(by_step)
    names = [k.removeprefix("weight/") for k in by_step[steps[-1]] if k.startswith("weight/")]
    weights = {name: [by_step[s].get(f"weight/{name}", np.nan) for s in steps] for name in names}
    return _plots().task_weights_figure(steps, weights, f"task weights: {run.name}")


def _step_time_figure(run: RunData, warmup: int) -> tuple[Figure | str, list[str]]:
    per_rank, notes = {}, []
    for rank, records in sorted(run.records.items()):
        kept = skip_warmup(records, warmup)
        if not kept and records:
            notes.append(
                f"rank {rank} logged {len(records)} steps, not more than the {warmup} warm-up steps: "
                "its mean includes them"
            )
            kept = records
        if kept:
            per_rank[rank] = phase_means(kept)
    if not per_rank:
        return "no step records with phase times in metrics/rank<N>.jsonl", notes
    fig = _plots().step_time_figure(per_rank, f"step time: {run.name}")
    fig.axes[0].set_xlabel(f"mean over logged steps; {warmup} skipped after each start", fontsize=8)
    return fig, notes


def _pick_gramian(run: RunData, step: int | None) -> tuple[int, np.ndarray] | str:
    found = gramian_steps(run.path)
    if not found:
        return (
            f"no Gramians in {run.path / GRAMIAN_DIR} (the trainer saves one per logged step; "
            "runs from before that have none)"
        )
    if step is not None:
        if step not in found:
            listed = [str(s) for s in found]
            shown = ", ".join(listed if len(listed) <= 10 else [*listed[:5], "...", *listed[-5:]])
            return f"no Gramian at step {step}; the steps with one are {shown}"
        gramian = np.load(found[step])
        if not np.isfinite(gramian).all():
            return f"the Gramian at step {step} is not finite (a skipped step)"
        return step, gramian
    for candidate in reversed(found):
        gramian = np.load(found[candidate])
        if np.isfinite(gramian).all():
            return candidate, gramian
    return "every saved Gramian is non-finite (every logged step was skipped)"


def _cosine_figure(run: RunData, step: int | None) -> Figure | str:
    picked = _pick_gramian(run, step)
    if isinstance(picked, str):
        return picked
    at, gramian = picked
    names = run.task_names
    if len(names) != gramian.shape[0]:
        names = [f"task {i}" for i in range(gramian.shape[0])]
    return _plots().gradient_cosine_figure(
        gradient_cosines(gramian), names, f"gradient cosines: {run.name}, step {at}"
    )


def _figures_and_notes(
    run: RunData, step: int | None, warmup: int, *, with_error: bool
) -> tuple[dict[str, Figure], dict[str, str]]:
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    if with_error:
        errors = _errors(run)
        if any(e is not None for e in errors.values()):
            figures["task_error"] = _plots().task_error_figure({run.name: errors})
        else:
            skipped["task_error"] = "no test errors in summary.json (no summary: the run has not finished?)"
    built: dict[str, Figure | str] = {"task_weights": _weights_figure(run)}
    built["step_time"], run.notes = _step_time_figure(run, warmup)
    built["gradient_cosine"] = _cosine_figure(run, step)
    for key, value in built.items():
        if isinstance(value, str):
            skipped[key] = value
        else:
            figures[key] = value
    return figures, skipped


def run_figures(run_dir: str | Path, *, step: int | None = None, warmup: int = 2) -> dict[str, Figure]:
    """The figures of one run by name (task_error, task_weights, step_time, gradient_cosine); a
    figure whose input the run lacks is left out. `step`: the Gramian's step (default: the last)."""
    return _figures_and_notes(load_run(run_dir), step, warmup, with_error=True)[0]


def log_figures(tb_dir: str | Path, step: int, figures: dict[str, Figure]) -> None:
    """Write the figures to TensorBoard as images `report/<name>` at `step` (an event file of its own)."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: a second of start-up

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for name, fig in figures.items():
            writer.add_image(f"report/{name}", _plots().to_rgb(fig), global_step=step, dataformats="HWC")
    finally:
        writer.close()


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _unique_names(runs: Sequence[RunData]) -> None:
    """Name every run by its directory; two runs with the same directory name get the parent's too."""
    seen: dict[str, int] = {}
    for run in runs:
        base = run.name
        if sum(r.name == base for r in runs) > 1:
            base = f"{run.path.resolve().parent.name}/{run.name}"
        seen[base] = seen.get(base, 0) + 1
        run.name = base if seen[base] == 1 else f"{base}-{seen[base]}"


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _run_section(run: RunData, images: dict[str, str], skipped: dict[str, str]) -> list[str]:
    lines = [f"## Run `{run.name}`", "", f"Directory: `{run.path}`"]
    summary = run.summary
    if summary is None:
        lines += ["", "No summary.json: the run has not finished (or crashed); figures from its logs only."]
    else:
        config = summary.get("config") or {}
        balancer = (config.get("balancer") or {}).get("name", "?")
        dataset = (config.get("data") or {}).get("name", "?")
        facts = [
            f"data `{dataset}`",
            f"balancer `{balancer}`",
            f"{summary.get('steps', '?')} steps",
            f"world size {summary.get('world_size', '?')}",
        ]
        if isinstance(summary.get("wall_time_s"), (int, float)):
            facts.append(f"wall time {summary['wall_time_s']:.1f} s")
        lines += [
            "",
            ", ".join(facts) + ".",
            "",
            "| task | error | accuracy | F1 | loss | labelled |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        tasks = summary.get("tasks") or {}
        for name, m in tasks.items():
            m = m if isinstance(m, dict) else {}
            error = task_error(m)
            lines.append(
                f"| {name} | {_fmt(error)} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('f1'))} | "
                f"{_fmt(m.get('loss'))} | {m.get('labelled', '-')} |"
            )
        overall = summary.get("metrics") or {}
        lines.append("")
        if "average_error" in overall:
            lines.append(f"Average error over tasks: **{overall['average_error']:.4f}**.")
        elif any(task_error(m) is not None for m in tasks.values() if isinstance(m, dict)):
            lines.append(f"Average error over tasks: **{average_error(tasks):.4f}** (from the table above).")
        if "delta_m" in overall:
            source = (config.get("eval") or {}).get("baseline") or "eval.baseline"
            lines.append(
                f"Delta-m against `{source}`: **{overall['delta_m']:+.2f} %** "
                "(mean relative error change per task; negative: lower error than the baseline)."
            )
    for key in ("task_weights", "step_time", "gradient_cosine"):
        if key in images:
            lines += ["", f"![{_TITLES[key]}]({images[key]})"]
    if skipped or run.notes:
        lines += ["", "Not drawn or approximate:"]
        lines += [f"- {_TITLES[key]}: {why}" for key, why in skipped.items()]
        lines += [f"- step time: {note}" for note in run.notes]
    return lines


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, step: int | None = None, warmup: int = 2
) -> Path:
    """Write the figures (PNG) and report.md of the runs into `out_dir`; returns report.md's path.

    Every run directory is read (and refused) before anything is written. With one run the figures
    are task_error.png, task_weights.png, step_time.png, gradient_cosine.png; with several,
    task_error.png compares them all and the others get the run's name: task_weights_<run>.png.
    """
    if not run_dirs:
        raise RunDirError("report: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lines = ["# dist_mtl report", "", "Runs: " + ", ".join(f"`{r.name}`" for r in runs) + "."]
        errors = {run.name: _errors(run) for run in runs if run.summary is not None}
        if any(e is not None for per_task in errors.values() for e in per_task.values()):
            _plots().save_png(_plots().task_error_figure(errors), out / "task_error.png")
            lines += ["", "## Test error per task", "", "![test error per task](task_error.png)"]
        else:
            lines += ["", "No run has a summary.json with test errors: no task_error.png."]
        for run in runs:
            figures, skipped = _figures_and_notes(run, step, warmup, with_error=False)
            suffix = "" if len(runs) == 1 else f"_{_file_stem(run.name)}"
            images = {}
            for key, fig in figures.items():
                images[key] = _plots().save_png(fig, out / f"{key}{suffix}.png").name
            lines += ["", *_run_section(run, images, skipped)]
        report = out / REPORT_FILE
        report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"report: cannot write into {out}: {exc.strerror or exc}") from None
    return report


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """RUN_DIR/report for one run; ./report for several (no run owns a comparison)."""
    return Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report")


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `report` on the `dist-mtl` sub-parsers (the object `add_subparsers` returned)."""
    p = subparsers.add_parser(
        "report",
        help="figures and a Markdown summary of one or several runs",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: RUN_DIR/report for one run, ./report for several)",
    )
    p.add_argument(
        "--step",
        type=int_at_least(0),
        default=None,
        help="logged step of the gradient-cosine heatmap (default: the last with a finite Gramian)",
    )
    p.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=2,
        help="logged steps left out of the step-time means after each (re)start (default: %(default)s)",
    )
    p.set_defaults(func=run_report)
    return p


def run_report(ns: argparse.Namespace) -> int:
    """The `report` command; a bad run directory raises RunDirError (one line, exit 2, in cli.main)."""
    out = ns.out if ns.out is not None else default_out_dir(ns.run_dirs)
    path = write_report(ns.run_dirs, out, step=ns.step, warmup=ns.warmup)
    print(f"wrote {path}")
    return 0
