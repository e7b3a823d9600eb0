"""Run directories and resume: nothing is overwritten by mistake, logs describe one history, failed
runs say so. Each test names the issue behaviour it pins."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import atomic_torch_save, load_checkpoint
from dist_mtl.errors import CheckpointError, RunDirError, TrainingFailed
from dist_mtl.observe import profile_report
from dist_mtl.trainer import train
from tests.integration.small_runs import put_nan_in_sample_five, small_config


def _cfg(run_dir: Path, *extra: str):
    return small_config(run_dir, *extra)


def _snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def _step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "time/step" in r]


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=8", "train.checkpoint_every=4"))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint is at step 8 but this run has only 4 steps"):
        train(_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=4"), resume=True)
    assert _snapshot(tmp_path) == before


def test_resume_with_a_changed_model_or_balancer_names_the_fields(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=2"))
    with pytest.raises(CheckpointError, match=r"model.hidden: checkpoint \[32\], config \[48\]"):
        train(_cfg(tmp_path, "train.steps=4", "model.hidden=[48]"), resume=True)
    with pytest.raises(CheckpointError, match="balancer.name: checkpoint 'mgda', config 'mamg'"):
        train(_cfg(tmp_path, "train.steps=4", "balancer.name=mamg"), resume=True)


def test_a_crash_between_checkpoints_then_resume_logs_every_step_once(tmp_path: Path) -> None:
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(_cfg(full, "train.steps=8", "train.checkpoint_every=4"))
    train(_cfg(crashed, "train.steps=8", "train.checkpoint_every=4"))
    # The state a crash after step 8's log line but before its checkpoint leaves behind:
    # logs to step 8, last good checkpoint at step 4.
    checkpoints = crashed / "checkpoints"
    shutil.copy(checkpoints / "step_00000004.pt", checkpoints / "last.pt")
    (checkpoints / "step_00000008.pt").unlink()
    (crashed / "summary.json").unlink()
    train(_cfg(crashed, "train.steps=8", "train.checkpoint_every=4"), resume=True)
    records = _step_records(crashed)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["restart"] for r in records] == [0] * 4 + [1] * 4
    # profile: 8 steps, minus 2 warm-up steps after each of the two starts
    assert "steps measured: 4" in profile_report(crashed)
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(checkpoints / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_last_checkpoint_resumes_from_the_newest_readable_one(tmp_path: Path) -> None:
    train(_cfg(tmp_path / "full", "train.steps=8"))
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=4", "train.checkpoint_every=2"))
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    train(_cfg(run, "train.steps=8"), resume=True)  # from step_00000002.pt
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_that_holds_a_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=3"))
    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--overwrite"):
        train(_cfg(tmp_path, "train.steps=3"))
    with pytest.raises(RunDirError, match="contradict"):
        train(_cfg(tmp_path, "train.steps=3"), resume=True, overwrite=True)
    train(_cfg(tmp_path, "train.steps=2"), overwrite=True)
    assert [r["step"] for r in _step_records(tmp_path)] == [1, 2]  # the old run's records are gone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]


def test_unwritable_run_dir_is_a_run_dir_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="run_dir .*a_file/run is not writable"):
        train(_cfg(blocker / "run", "train.steps=1"))


def test_wall_time_is_the_total_over_restarts(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=2"))
    last = tmp_path / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    atomic_torch_save({**ckpt, "wall_time_s": 1000.0}, last)  # as if the first session had run 1000 s
    summary = train(_cfg(tmp_path, "train.steps=4"), resume=True)
    assert 1000.0 < summary["wall_time_s"] < 1100.0 and summary["restarts"] == 1


def test_a_run_that_learns_nothing_stops_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match=r"of 10 steps were skipped \(steps 2, 3, .*optim.lr=1e\+30"):
        train(_cfg(tmp_path, "train.steps=40", "optim.lr=1e30", "optim.name=sgd", "optim.momentum=0"))


def test_a_few_skipped_steps_do_not_stop_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_nan_in_sample_five(monkeypatch)
    assert train(_cfg(tmp_path, "train.steps=16", "train.max_skipped_fraction=0.2"))["skipped_steps"] == 2
    with pytest.raises(TrainingFailed, match=r"2 of 14 steps were skipped \(steps 3, 14\)"):
        train(_cfg(tmp_path / "strict", "train.steps=16", "train.max_skipped_fraction=0.1"))


def test_a_short_run_that_learns_nothing_fails_too(tmp_path: Path) -> None:
    """Runs shorter than the grace period are checked on their last step."""
    with pytest.raises(TrainingFailed, match="of 9 steps were skipped"):
        train(_cfg(tmp_path, "train.steps=9", "optim.lr=1e30", "optim.name=sgd", "optim.momentum=0"))


def test_resuming_a_finished_run_logs_its_final_evaluation_once(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=16", "train.checkpoint_every=8"))
    before = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    summary = train(_cfg(tmp_path, "train.steps=16", "train.checkpoint_every=8"), resume=True)
    lines = (tmp_path / "metrics" / "rank0.jsonl").read_text().splitlines()
    evaluations = [r["step"] for r in map(json.loads, lines) if any(k.startswith("test/") for k in r)]
    assert evaluations == [8, 16]
    after = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert after["history"] == before["history"]
    assert summary["tasks"]["left"]["accuracy"] == json.loads(before["history"])[-1]["test/accuracy/left"]


def test_a_refused_resume_creates_nothing(tmp_path: Path) -> None:
    run = tmp_path / "not" / "there"
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train(_cfg(run, "train.steps=2"), resume=True)
    assert not (tmp_path / "not").exists()


def test_resume_on_fewer_ranks_cuts_the_old_ranks_logs_too(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2"))
    shutil.copy(tmp_path / "checkpoints" / "step_00000002.pt", tmp_path / "checkpoints" / "last.pt")
    old_rank = tmp_path / "metrics" / "rank1.jsonl"  # as if the first run had had two ranks
    old_rank.write_text("".join(json.dumps({"step": s, "time/step": 0.1}) + "\n" for s in range(1, 5)))
    train(_cfg(tmp_path, "train.steps=4"), resume=True)
    assert [json.loads(line)["step"] for line in old_rank.read_text().splitlines()] == [1, 2]
