"""Atomic checkpoints: temp file, fsync, rename, so a crash never corrupts the last good one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write `obj` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    """Load with `weights_only=True`: a checkpoint from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is unreadable or not a dist_mtl checkpoint: {exc}") from exc
