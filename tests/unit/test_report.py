"""`dist-mtl report`: figures and report.md from real run directories, Gramian files, TensorBoard images."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_mtl.errors import RunDirError, UserError
from dist_mtl.observe.gramians import (
    gradient_cosines,
    gramian_path,
    read_gramians,
    truncate_gramians,
    write_gramian,
)
from dist_mtl.observe.plots import (
    gradient_cosine_figure,
    step_time_figure,
    task_error_figure,
    task_weights_figure,
)
from dist_mtl.observe.recorder import PHASES
from dist_mtl.observe.report import phase_means
from dist_mtl.observe.run_report import (
    add_report_parser,
    default_out_dir,
    load_run,
    log_figures,
    run_figures,
    write_report,
)
from dist_mtl.trainer import train
from tests.integration.small_runs import small_config

STEPS = 8
TASK_NAMES = ("left", "right")


def _gramian(step: int) -> torch.Tensor:
    g = torch.tensor([[1.0, 0.5, 0.0], [-0.2, 1.0, 0.3]], dtype=torch.float64) * step
    return g @ g.T


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real 8-step runs logging every step: "trained" as the trainer left it; "mgda" with known
    Gramians every other step instead of the trainer's; "uniform" without any (an older run)."""
    root = tmp_path_factory.mktemp("runs")
    mgda, uniform = root / "mgda", root / "uniform"
    train(small_config(mgda, f"train.steps={STEPS}"))
    train(small_config(uniform, f"train.steps={STEPS}", "balancer.name=uniform"))
    shutil.copytree(mgda, root / "trained")
    shutil.rmtree(mgda / "gramians", ignore_errors=True)
    shutil.rmtree(uniform / "gramians", ignore_errors=True)
    for step in range(2, STEPS + 1, 2):
        write_gramian(mgda, step, _gramian(step))
    return {"mgda": mgda, "uniform": uniform, "trained": root / "trained"}


def test_the_trainer_saves_a_gramian_per_logged_step_and_the_heatmap_reads_it(runs: dict[str, Path]) -> None:
    gramians = read_gramians(runs["trained"])
    assert list(gramians) == list(range(1, STEPS + 1))  # train.log_every=1
    assert all(g.shape == (2, 2) and np.isfinite(g).all() for g in gramians.values())
    image = run_figures(runs["trained"])["gradient_cosine"].axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(image, gradient_cosines(gramians[STEPS]))
    np.testing.assert_allclose(np.diag(image), 1.0)


def _assert_png(path: Path, min_width: int = 300, min_height: int = 200) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: a truncated PNG fails here
        width, height = image.size
    assert width >= min_width and height >= min_height, (path, image.size)
    return width, height


def test_report_of_one_run_has_every_figure_and_task(runs: dict[str, Path], tmp_path: Path) -> None:
    report = write_report([runs["mgda"]], tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert names == {"task_error.png", "task_weights.png", "step_time.png", "gradient_cosine.png"}
    for name in names:
        _assert_png(tmp_path / "out" / name)
    text = report.read_text()
    for task in TASK_NAMES:
        assert f"| {task} |" in text
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted(names)
    summary = json.loads((runs["mgda"] / "summary.json").read_text())
    errors = [1 - summary["tasks"][t]["accuracy"] for t in TASK_NAMES]
    assert f"{np.mean(errors):.4f}" in text  # the average error, from the table when summary has none
    assert "Not drawn" not in text


def test_report_compares_runs_and_says_why_a_figure_is_missing(runs: dict[str, Path], tmp_path: Path) -> None:
    report = write_report([runs["mgda"], runs["uniform"]], tmp_path)
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {
        "task_error.png",
        "task_weights_mgda.png",
        "task_weights_uniform.png",
        "step_time_mgda.png",
        "step_time_uniform.png",
        "gradient_cosine_mgda.png",
    }
    text = report.read_text()
    assert "## Run `mgda`" in text and "## Run `uniform`" in text
    assert f"gradient cosines: no Gramians in {runs['uniform'] / 'gramians'}" in text
    # Two bars per task: one per run.
    fig = task_error_figure({"a": {"left": 0.1, "right": 0.2}, "b": {"left": 0.3, "right": None}})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([0.1, 0.2, 0.3])


def test_summary_metrics_and_f1_reach_the_report(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    summary = json.loads((runs["mgda"] / "summary.json").read_text())
    summary["tasks"] = {
        "Smiling": {"loss": 0.3, "accuracy": 0.9, "error": 0.1, "f1": 0.875, "labelled": 40},
        "Bald": {"labelled": 0},
    }
    summary["metrics"] = {"average_error": 0.1, "delta_m": -3.25}
    summary["config"]["eval"] = {"baseline": "single_task.json"}
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report([run], tmp_path / "out").read_text()
    assert "| Smiling | 0.1000 | 0.9000 | 0.8750 | 0.3000 | 40 |" in text
    assert "| Bald | - | - | - | - | 0 |" in text
    assert "**0.1000**" in text and "Delta-m against `single_task.json`: **-3.25 %**" in text
    # Only the summary is there: the figures that need the logs are skipped, each with its reason.
    assert "task weights: no task weights" in text and "step time per phase and rank: no step records" in text


def test_figures_show_the_numbers_they_are_given(runs: dict[str, Path]) -> None:
    figures = run_figures(runs["mgda"])
    assert set(figures) == {"task_error", "task_weights", "step_time", "gradient_cosine"}
    summary = json.loads((runs["mgda"] / "summary.json").read_text())
    bars = [p.get_height() for p in figures["task_error"].axes[0].patches]
    assert bars == pytest.approx([1 - summary["tasks"][t]["accuracy"] for t in TASK_NAMES])
    records = [
        json.loads(line) for line in (runs["mgda"] / "metrics" / "rank0.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "weight/left" in r]
    lines = figures["task_weights"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == list(TASK_NAMES)
    assert list(lines[0].get_xdata()) == [r["step"] for r in steps]
    assert list(lines[1].get_ydata()) == pytest.approx([r["weight/right"] for r in steps])
    # The default heatmap is the last Gramian's; --step picks another.
    assert figures["gradient_cosine"].axes[0].get_title().endswith(f"step {STEPS}")
    at_four = run_figures(runs["mgda"], step=4)["gradient_cosine"]
    want = gradient_cosines(_gramian(4).numpy())
    np.testing.assert_allclose(at_four.axes[0].get_images()[0].get_array(), want)


def test_a_step_without_a_gramian_is_reported_with_the_steps_that_have_one(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    assert "gradient_cosine" not in run_figures(runs["mgda"], step=3)
    text = write_report([runs["mgda"]], tmp_path, step=3).read_text()
    assert "no Gramian at step 3; the steps with one are 2, 4, 6, 8" in text


def test_step_time_bars_are_mean_phase_times_after_warmup(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for rank in (0, 1):
        lines = []
        for step in range(1, 6):
            times = {
                f"time/{p}": 0.001 * (i + 1) * (rank + 1) * (10 if step <= 2 else 1)
                for i, p in enumerate(PHASES)
            }
            total = sum(times.values()) + 0.002
            lines.append(json.dumps({"step": step, **times, "time/step": total}))
        lines.append(json.dumps({"step": 5, "test/accuracy/a": 0.5}))  # an evaluation record: not a step
        (metrics / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    fig = run_figures(tmp_path)["step_time"]
    patches = fig.axes[0].patches
    assert len(patches) == 2 * (len(PHASES) + 1)  # one segment per phase and "(other)", per rank
    for rank in (0, 1):
        segments = patches[rank::2]
        want = [1.0 * (i + 1) * (rank + 1) for i in range(len(PHASES))] + [2.0]  # ms, warm-up skipped
        assert [p.get_height() for p in segments] == pytest.approx(want)
    # Too few steps for the warm-up: the mean keeps them, and the report says so.
    text = write_report([tmp_path], tmp_path / "out", warmup=10).read_text()
    assert "rank 0 logged 5 steps, not more than the 10 warm-up steps" in text
    assert "no test errors in summary.json" not in text  # per-run task_error is not repeated
    assert phase_means([])["(other)"] == 0.0


@pytest.mark.parametrize("setup", ["missing", "empty", "file"])
def test_a_path_that_is_no_run_directory_is_a_run_dir_error_naming_it(tmp_path: Path, setup: str) -> None:
    path = tmp_path / "not_a_run"
    if setup == "empty":
        path.mkdir()
    elif setup == "file":
        path.write_text("x")
    with pytest.raises(RunDirError, match=f"{re.escape(str(path))} is not a run directory"):
        write_report([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_malformed_run_files_are_run_dir_errors_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{broken")
    with pytest.raises(RunDirError, match=re.escape(str(tmp_path / "summary.json"))):
        load_run(tmp_path)
    (tmp_path / "summary.json").unlink()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "rank0.jsonl").write_text('{"step": 1, "time/step": 1}\n[1]\n')
    with pytest.raises(RunDirError, match=r"rank0\.jsonl, line 2"):
        load_run(tmp_path)


def test_cli_parser_writes_the_report_and_refuses_bad_input(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="dist-mtl")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["report", str(runs["mgda"]), "--out", str(tmp_path / "r"), "--step", "2"])
    assert ns.func(ns) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r' / 'report.md'}"
    assert (tmp_path / "r" / "gradient_cosine.png").is_file()
    ns = parser.parse_args(["report", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="nothing is not a run directory"):
        ns.func(ns)
    with pytest.raises(SystemExit):
        parser.parse_args(["report", str(runs["mgda"]), "--step", "-1"])
    assert default_out_dir([runs["mgda"]]) == runs["mgda"] / "report"
    assert default_out_dir([runs["mgda"], runs["uniform"]]) == Path("report")


def test_report_figures_reach_tensorboard_as_images(runs: dict[str, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    figures = run_figures(runs["mgda"])
    log_figures(tmp_path / "tb", STEPS, figures)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {f"report/{name}" for name in figures}
    image = events.Images("report/gradient_cosine")[0]
    assert image.step == STEPS and image.width >= 300 and image.height >= 200
    png = tmp_path / "from_tb.png"
    png.write_bytes(image.encoded_image_string)
    assert _assert_png(png) == (image.width, image.height)


# --- Gramian files and cosines ------------------------------------------------------------------------


def test_gramian_files_round_trip_and_truncate(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        write_gramian(tmp_path, step, _gramian(step))
    (tmp_path / "gramians" / ".step_00000020.npy.tmp.123").write_bytes(b"half a file")  # a crash's leftover
    found = read_gramians(tmp_path)
    assert list(found) == [5, 10, 15]
    np.testing.assert_array_equal(found[10], _gramian(10).numpy())
    assert found[10].dtype == np.float64 and gramian_path(tmp_path, 10).name == "step_00000010.npy"
    truncate_gramians(tmp_path, 10)
    assert list(read_gramians(tmp_path)) == [5, 10]
    with pytest.raises(ValueError, match="square"):
        write_gramian(tmp_path, 1, torch.zeros(2, 3))
    assert read_gramians(tmp_path / "elsewhere") == {}


def test_cosines_are_finite_with_a_zero_row_and_match_the_definition() -> None:
    g = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 4.0]])  # task 1: no labels in the batch
    cos = gradient_cosines(g @ g.T)
    assert np.isfinite(cos).all()
    np.testing.assert_allclose(cos[1], 0.0)
    np.testing.assert_allclose(cos[:, 1], 0.0)
    assert cos[0, 2] == pytest.approx(-9 / 25) and cos[0, 0] == pytest.approx(1.0)
    nan = g @ g.T
    nan[2, 2] = np.nan
    assert np.isfinite(gradient_cosines(nan)).all()
    fig = gradient_cosine_figure(cos, ["a", "b", "c"], "t")
    assert np.isfinite(fig.axes[0].get_images()[0].get_array()).all()


def test_a_skipped_last_step_falls_back_to_the_last_finite_gramian(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "rank0.jsonl").write_text((runs["mgda"] / "metrics" / "rank0.jsonl").read_text())
    write_gramian(run, 2, _gramian(2))
    write_gramian(run, 4, torch.full((3, 3), float("nan"), dtype=torch.float64))
    assert run_figures(run)["gradient_cosine"].axes[0].get_title().endswith("step 2")
    assert "gradient_cosine" not in run_figures(run, step=4)


def test_many_tasks_widen_the_figure_and_rotate_the_labels() -> None:
    names = [f"a{i:02d}" for i in range(40)]  # short names: rotated because there are many
    errors = {run: dict.fromkeys(names, 0.1) for run in ("a", "b", "c")}
    fig = task_error_figure(errors)
    width, _ = fig.get_size_inches()
    assert width >= 15
    labels = fig.axes[0].get_xticklabels()
    assert [label.get_text() for label in labels] == names
    assert all(label.get_rotation() == 90 for label in labels)
    # Past a dozen tasks the weights are a task x step heatmap: every task keeps its label.
    weights = {name: [0.01 * i, 0.02 * i, 0.0] for i, name in enumerate(names)}
    heatmap = task_weights_figure([10, 20, 30], weights).axes[0]
    np.testing.assert_allclose(heatmap.get_images()[0].get_array(), np.array(list(weights.values())))
    assert [label.get_text() for label in heatmap.get_yticklabels()] == names
    assert [label.get_text() for label in heatmap.get_xticklabels()] == ["10", "20", "30"]
    few = step_time_figure({0: dict.fromkeys(PHASES, 0.01)}, "t")
    assert len(few.axes[0].patches) == len(PHASES) + 1


def test_the_cli_parser_does_not_import_matplotlib() -> None:
    """Every `dist-mtl` command builds the report parser; only drawing may pay matplotlib's start-up."""
    code = (
        "import sys, argparse\n"
        "from dist_mtl.observe.run_report import add_report_parser\n"
        "add_report_parser(argparse.ArgumentParser().add_subparsers())\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
