"""Atomic checkpoints: temp file, fsync, rename, so a crash never corrupts the last good one.

Loading uses `weights_only=True` (a checkpoint from elsewhere cannot run code). Resuming takes
`last.pt`, or, when that file is truncated or unreadable, the newest readable `step_*.pt`, and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from dist_mtl.errors import CheckpointError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write `obj` to `path` so that readers see either the old file or the complete new one.

    A failed write (full disk, unpicklable state) removes its temp file and leaves `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `step_<8-digit step>.pt` and then `last.pt` (both atomically)."""
    directory = checkpoint_dir(run_dir)
    path = directory / f"step_{step:08d}.pt"
    atomic_torch_save({**state, "step": step}, path)
    atomic_torch_save({**state, "step": step}, directory / "last.pt")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with `weights_only=True`; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable or not a dist_mtl checkpoint: {exc}") from exc
    return ckpt


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The checkpoints a resume would try, in order: `last.pt`, then `step_*.pt` from the newest."""
    directory = checkpoint_dir(run_dir)
    candidates = [directory / "last.pt", *sorted(directory.glob("step_*.pt"), reverse=True)]
    return [path for path in candidates if path.is_file()]


def load_latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """`last.pt`, or the newest readable `step_*.pt` when it is missing or broken (said on stderr)."""
    directory = checkpoint_dir(run_dir)
    problems = []
    for path in checkpoint_files(run_dir):
        try:
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
                raise CheckpointError(f"checkpoint {path} is not a dist_mtl checkpoint (no integer 'step')")
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            print(f"dist-mtl: warning: {'; '.join(problems)}; resuming from {path}", file=sys.stderr)
        return ckpt, path
    found = "; ".join(problems) if problems else "no last.pt or step_*.pt there"
    raise CheckpointError(f"--resume: no readable checkpoint in {directory} ({found})")
