"""The report's figures, built from plain numbers (no file access), so tests and TensorBoard share them.

Figures are `matplotlib.figure.Figure` objects rendered with the Agg canvas: no pyplot, no global
backend state, nothing that needs a display. Sizes grow with the number of tasks so that CelebA's 40
attributes stay legible, up to a cap beyond which tick labels are thinned instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dist_mtl.observe.recorder import PHASES

MAX_WIDTH_IN = 40.0  # inches; at the default 100 dpi, 4000 pixels
MAX_TICK_LABELS = 80  # more tasks than this: label every k-th one
MAX_WEIGHT_LINES = 12  # more tasks than this: the weights are drawn as a heatmap, not lines
PHASE_ORDER = (*PHASES, "(other)")


def new_figure(width: float, height: float) -> Figure:
    """A Figure with its own Agg canvas (no pyplot, so nothing global is touched or leaked)."""
    fig = Figure(figsize=(min(width, MAX_WIDTH_IN), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def to_rgb(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 image, for TensorBoard's add_image."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 1.0, n)]


def _task_ticks(ax, positions: np.ndarray, names: Sequence[str], axis: str = "x") -> None:
    """Task names as tick labels, rotated when there are many, thinned past MAX_TICK_LABELS."""
    every = max(1, -(-len(names) // MAX_TICK_LABELS))
    pos, labels = positions[::every], list(names)[::every]
    rotation = 0 if len(names) <= 6 and max(map(len, names), default=0) <= 10 else 90
    if axis == "x":
        ax.set_xticks(pos, labels, rotation=rotation, fontsize=8 if len(names) > 20 else 10)
    else:
        ax.set_yticks(pos, labels, fontsize=8 if len(names) > 20 else 10)


def task_error_figure(errors: Mapping[str, Mapping[str, float | None]]) -> Figure:
    """Grouped bars: one group per task, one bar per run (run name -> task -> test error or None).

    A task a run has no error for (no labelled test samples) has no bar in that run's colour.
    """
    runs = list(errors)
    tasks: list[str] = []
    for per_task in errors.values():
        tasks += [name for name in per_task if name not in tasks]
    if not runs or not tasks:
        raise ValueError("task_error_figure needs at least one run and one task")
    width = 0.8 / len(runs)
    x = np.arange(len(tasks), dtype=float)
    fig = new_figure(max(6.0, 1.5 + len(tasks) * max(0.35, 0.18 * len(runs))), 4.5)
    ax = fig.add_subplot()
    for i, (run, color) in enumerate(zip(runs, _colors(len(runs)), strict=True)):
        values = [errors[run].get(name) for name in tasks]
        present = [j for j, v in enumerate(values) if v is not None]
        ax.bar(
            x[present] + (i - (len(runs) - 1) / 2) * width,
            [values[j] for j in present],
            width=width,
            label=run,
            color=color,
        )
    _task_ticks(ax, x, tasks)
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.set_ylabel("test error (1 - accuracy)")
    ax.set_title("test error per task")
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return fig


def task_weights_figure(
    steps: Sequence[int], weights: Mapping[str, Sequence[float]], title: str = "task weights"
) -> Figure:
    """The balancer's weight of each task at each logged step: one line per task (GetMTL's figure)
    up to MAX_WEIGHT_LINES tasks; beyond that a task x step heatmap, where every task keeps its label."""
    if not steps or not weights:
        raise ValueError("task_weights_figure needs at least one logged step and one task")
    names = list(weights)
    if len(names) > MAX_WEIGHT_LINES:
        values = np.array([np.asarray(weights[name], dtype=float) for name in names])
        fig = new_figure(max(8.0, 3.0 + 0.08 * len(steps)), max(4.5, 1.5 + 0.18 * len(names)))
        ax = fig.add_subplot()
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
        # Columns are logged steps in order (their spacing may vary); label a few with their step.
        columns = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
        ax.set_xticks(columns, [str(steps[i]) for i in columns])
        _task_ticks(ax, np.arange(len(names), dtype=float), names, "y")
        fig.colorbar(image, ax=ax, label="weight")
    else:
        fig = new_figure(8.0, 4.5)
        ax = fig.add_subplot()
        for name, color in zip(names, _colors(len(names)), strict=True):
            marker = "." if len(steps) < 30 else None
            ax.plot(steps, weights[name], label=name, color=color, linewidth=1.2, marker=marker)
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("step")
    ax.set_title(title)
    return fig


def step_time_figure(per_rank: Mapping[int, Mapping[str, float]], title: str = "step time") -> Figure:
    """Stacked bars, one per rank: mean milliseconds per step spent in each phase (seconds given)."""
    if not per_rank:
        raise ValueError("step_time_figure needs at least one rank")
    ranks = sorted(per_rank)
    fig = new_figure(max(5.0, 2.5 + 0.5 * len(ranks)), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(ranks), dtype=float)
    bottom = np.zeros(len(ranks))
    for phase, color in zip(PHASE_ORDER, _colors(len(PHASE_ORDER)), strict=True):
        ms = np.array([1e3 * per_rank[r].get(phase, 0.0) for r in ranks])
        ax.bar(x, ms, bottom=bottom, label=phase, color=color, width=0.6)
        bottom += ms
    ax.set_xticks(x, [f"rank {r}" for r in ranks], rotation=0 if len(ranks) <= 8 else 90)
    ax.set_ylabel("mean time per step (ms)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def gradient_cosine_figure(cosines: np.ndarray, task_names: Sequence[str], title: str) -> Figure:
    """Heatmap of the pairwise cosines of the task gradients (diverging: conflicts are blue)."""
    t = cosines.shape[0]
    if cosines.shape != (t, t) or len(task_names) != t:
        raise ValueError(f"expected a {len(task_names)} x {len(task_names)} matrix; got {cosines.shape}")
    side = min(MAX_WIDTH_IN, max(5.0, 2.5 + 0.28 * t))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(cosines, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(t, dtype=float)
    _task_ticks(ax, ticks, task_names, "x")
    _task_ticks(ax, ticks, task_names, "y")
    if t <= 12:
        for i in range(t):
            for j in range(t):
                value = cosines[i, j]
                color = "white" if abs(value) > 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine")
    return fig
