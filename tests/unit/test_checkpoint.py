"""Checkpoints are atomic, load with weights_only=True, and resume falls back past a broken last.pt."""

from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import atomic_torch_save, load_checkpoint, load_latest_checkpoint, save_checkpoint
from dist_mtl.errors import CheckpointError


def test_save_writes_step_and_last(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(3.0)}}
    path = save_checkpoint(tmp_path, 7, state)
    assert path.name == "step_00000007.pt"
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 7 and torch.equal(last["model"]["w"], torch.arange(3.0))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_failed_write_keeps_the_last_good_file_and_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": _Unpicklable()}, target)
    assert torch.equal(load_checkpoint(target)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no .last.pt.tmp.<pid> left behind


def test_foreign_pickle_and_missing_file_are_checkpoint_errors(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("/etc")}, path)  # an arbitrary class: not allowed with weights_only
    with pytest.raises(CheckpointError, match="unreadable or not a dist_mtl checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_truncated_last_falls_back_to_newest_readable_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))})
    directory = tmp_path / "checkpoints"
    for name in ("last.pt", "step_00000030.pt"):  # a crash cut both (e.g. a full disk)
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])
    ckpt, path = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000020.pt" and ckpt["step"] == 20
    err = capsys.readouterr().err
    assert "last.pt is unreadable" in err and "resuming from" in err and "step_00000020.pt" in err


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="last.pt is unreadable"):
        load_latest_checkpoint(tmp_path)
