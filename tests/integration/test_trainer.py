"""End-to-end single-process training: run directory contents, resume equality, skipped steps."""

import json
from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import load_checkpoint
from dist_mtl.trainer import train
from tests.integration.small_runs import put_nan_in_sample_five, small_config


def _cfg(run_dir: Path, *extra: str):
    return small_config(run_dir, *extra)


def test_run_directory_has_summary_checkpoints_logs(tmp_path: Path) -> None:
    summary = train(_cfg(tmp_path, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=4"))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps"] == 8 and set(on_disk["tasks"]) == {"left", "right"}
    for metrics in on_disk["tasks"].values():
        assert set(metrics) == {"loss", "accuracy", "error", "labelled"} and 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["error"] == pytest.approx(1.0 - metrics["accuracy"])
    assert on_disk["config"]["balancer"]["name"] == "mgda" and summary["skipped_steps"] == 0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "step_00000004.pt", "step_00000008.pt"]
    assert "model" in load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (tmp_path / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics" / "rank0.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {
        "time/forward",
        "time/backward",
        "time/solve",
        "time/optimizer",
        "weight/left",
        "loss/right",
        "solver/iterations",
        "grad/cos_min",
        "direction/decreases_all_tasks",
        "solver/gap",
    } <= set(steps[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("balancer", ["mamg", "getmtl"])
def test_resume_equals_uninterrupted(tmp_path: Path, balancer: str) -> None:
    extra = [f"balancer.name={balancer}", "train.steps=6", "optim.name=adam"]
    train(_cfg(tmp_path / "full", *extra))
    train(_cfg(tmp_path / "resumed", *extra[:-2], "train.steps=3", "optim.name=adam"))
    train(_cfg(tmp_path / "resumed", *extra), resume=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["step"] == full["step"] == 6
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_rep_mode_trains(tmp_path: Path) -> None:
    """MGDA-UB learns: the loss falls and both digits are recognised far above chance (10 %)."""
    summary = train(_cfg(tmp_path, "train.mode=rep", "train.steps=48", "optim.lr=0.01"))
    assert summary["steps"] == 48 and summary["skipped_steps"] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics" / "rank0.jsonl").read_text().splitlines()]
    losses = [r["loss/mean"] for r in records if "loss/mean" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for task in ("left", "right"):
        assert summary["tasks"][task]["accuracy"] > 0.5, summary["tasks"]


def test_non_finite_gramian_skips_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_nan_in_sample_five(monkeypatch)
    cfg = _cfg(tmp_path, "train.steps=16")  # two epochs of 8 batches: sample 5 is in one batch per epoch
    summary = train(cfg)
    assert summary["skipped_steps"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 2
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_too_many_tasks_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.num_tasks"):
        train(_cfg(tmp_path, "data.tasks=binary", "data.num_tasks=500", "train.steps=1"))


def test_solver_events_are_counted_on_every_step_not_only_logged_ones(tmp_path: Path) -> None:
    """With an iteration cap of 1 on 8 tasks every min-norm solve stops unconverged: the run total in a
    record logged every 3rd step must count the steps in between too."""
    cfg = _cfg(
        tmp_path,
        "data.tasks=binary",
        "data.num_tasks=8",
        "balancer.max_iter=1",
        "train.steps=7",
        "train.log_every=3",
    )
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics" / "rank0.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step" in r]
    assert [r["step"] for r in steps] == [3, 6, 7]
    assert [r["total/unconverged_solves"] for r in steps] == [3, 6, 7]
    assert summary["events"]["unconverged_solves"] == 7


def test_report_figures_reach_tensorboard_and_the_report_command(tmp_path: Path, capsys) -> None:
    """observe.figures: the finished run's figures are TensorBoard images; `dist-mtl report` draws
    the same run; a directory that holds no run is a one-line error."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from dist_mtl.cli import main

    run_dir = tmp_path / "run"
    train(_cfg(run_dir, "train.steps=4", "observe.figures=true", "eval.baseline="))
    assert sorted(p.name for p in (run_dir / "gramians").iterdir())[-1] == "step_00000004.npy"
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    names = {"task_error", "task_weights", "step_time", "gradient_cosine"}
    assert {f"report/{name}" for name in names} <= set(events.Tags()["images"])
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert {f"{name}.png" for name in names} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert "left" in (tmp_path / "report" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_labels_and_a_baseline_give_counts_and_delta_m(tmp_path: Path) -> None:
    """Synthetic data with 40 % of its labels missing: labelled counts in the logs and summary.json,
    and Delta-m against a baseline file (here: the uniform run's summary.json)."""
    extra = ["data.name=synthetic", "data.num_tasks=4", "data.num_clusters=2", "data.input_dim=8"]
    extra += ["data.missing_labels=0.4", "train.steps=6"]
    train(_cfg(tmp_path / "uniform", *extra, "balancer.name=uniform"))
    baseline = tmp_path / "uniform" / "summary.json"
    summary = train(_cfg(tmp_path / "mgda", *extra, f"eval.baseline={baseline}"))
    seen = summary["data"]["labelled_seen"]
    assert set(seen) == {f"task_{t}" for t in range(4)}
    assert all(0.45 * 6 * 64 < n < 0.75 * 6 * 64 for n in seen.values())
    base = json.loads(baseline.read_text())["tasks"]
    expected = (
        100 / 4 * sum((m["error"] - base[t]["error"]) / base[t]["error"] for t, m in summary["tasks"].items())
    )
    assert summary["metrics"]["delta_m"] == pytest.approx(expected)
    record = json.loads((tmp_path / "mgda" / "metrics" / "rank0.jsonl").read_text().splitlines()[0])
    assert sum(record[f"labelled/{t}"] for t in seen) < 4 * 64
