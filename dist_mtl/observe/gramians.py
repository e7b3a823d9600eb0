"""The T x T Gramians of logged steps, kept in RUN_DIR/gramians/ for the gradient-cosine heatmap.

Only logged steps (train.log_every) are written, one small .npy each, O(T^2) per logged step. A file
is written under a temporary name and renamed, so a reader (or a crash) never sees half of one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

GRAMIAN_DIR = "gramians"
_FILE = re.compile(r"step_(\d+)\.npy")


def gramian_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / GRAMIAN_DIR / f"step_{step:08d}.npy"


def write_gramian(run_dir: str | Path, step: int, gramian: torch.Tensor | np.ndarray) -> None:
    """Save the Gramian of `step` as RUN_DIR/gramians/step_{step:08d}.npy (float64), atomically."""
    array = (
        gramian.detach().to("cpu", torch.float64).numpy() if isinstance(gramian, torch.Tensor) else gramian
    )
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"a Gramian is a square matrix; got shape {array.shape}")
    path = gramian_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("wb") as file:  # a file object: np.save would append ".npy" to a tmp name
        np.save(file, array)
    os.replace(tmp, path)


def gramian_steps(run_dir: str | Path) -> dict[int, Path]:
    """The steps with a saved Gramian and their files, in step order (temporary files ignored)."""
    folder = Path(run_dir) / GRAMIAN_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_gramians(run_dir: str | Path) -> dict[int, np.ndarray]:
    """Every saved Gramian by step, in step order."""
    return {step: np.load(path) for step, path in gramian_steps(run_dir).items()}


def truncate_gramians(run_dir: str | Path, step: int) -> None:
    """Delete the Gramians of steps after `step`: on resume, the interrupted run's later steps are redone."""
    for later, path in gramian_steps(run_dir).items():
        if later > step:
            path.unlink(missing_ok=True)


def gradient_cosines(gramian: np.ndarray) -> np.ndarray:
    """cos_ij = M_ij / sqrt(M_ii M_jj), and 0 where either norm is 0 (a task with no labels in the
    batch has a zero gradient) or the entry is not finite, so the heatmap is always finite."""
    gramian = np.asarray(gramian, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    scale = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(scale > 0, gramian / np.where(scale > 0, scale, 1.0), 0.0)
    return np.clip(np.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
