"""Conversions at the balancer boundary: callers hand in torch or NumPy, the math runs on float64 NumPy."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def as_gramian(M: ArrayLike, name: str = "M") -> np.ndarray:
    """A symmetric float64 copy of the T x T Gramian; float32 accumulation may leave M slightly asymmetric."""
    if isinstance(M, torch.Tensor):
        M = M.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(M, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (T, T) matrix; got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; got NaN or inf entries")
    symmetric = arr + arr.T  # a new array: the caller's M is never written
    symmetric *= 0.5
    return symmetric


def as_losses(losses: ArrayLike | None, num_tasks: int, name: str = "losses") -> np.ndarray:
    """The (T,) task losses as float64; they are only read by balancers that declare `needs_losses`."""
    if losses is None:
        raise ValueError(f"{name} must be a ({num_tasks},) tensor for this balancer; got None")
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(losses, dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_tasks:
        raise ValueError(f"{name} must have {num_tasks} entries (one per task); got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; got {arr.tolist()}")
    return arr


def to_torch(x: np.ndarray) -> torch.Tensor:
    """A float64 CPU tensor that owns its memory (callers may keep it across steps)."""
    return torch.from_numpy(np.array(x, dtype=np.float64, copy=True))
