"""Checkpoints are atomic and load with weights_only=True."""

from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint


def test_save_writes_step_and_last(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(3.0)}}
    path = save_checkpoint(tmp_path, 7, state)
    assert path.name == "step_00000007.pt"
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 7 and torch.equal(last["model"]["w"], torch.arange(3.0))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_failed_write_keeps_the_last_good_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Unpicklable()}, target)
    assert torch.equal(load_checkpoint(target)["v"], torch.ones(2))


def test_foreign_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("/etc")}, path)  # an arbitrary class: not allowed with weights_only
    with pytest.raises(ValueError, match="unreadable or not a dist_mtl checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
