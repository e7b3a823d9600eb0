"""The run directory's life cycle: refuse to mix two runs, replace one on request, cut logs on resume.

A run directory holds one run. Training into one that already holds a run is an error unless the
user resumes it (`--resume`) or replaces it (`--overwrite`). A resumed run continues from its
checkpoint's step, so records written after that step by the interrupted run are dropped: the logs
then describe exactly one history, and `dist-mtl profile` counts every step once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_mtl.errors import CheckpointError, RunDirError

RUN_FILES = ("config.yaml", "summary.json")
RUN_DIRS = ("checkpoints", "metrics", "tb", "profile", "gramians")
# Config fields a checkpoint cannot be resumed under once changed: they fix the model's shapes, the
# tasks, or what the balancer state means. Everything else (lr, steps, logging) may change on resume.
RESUME_FIXED = (
    "model",
    "data.name",
    "data.tasks",
    "data.num_tasks",
    "data.input_dim",
    "data.image_size",
    "balancer.name",
    "optim.name",
)


def holds_run(run_dir: Path) -> list[str]:
    """The entries of `run_dir` that belong to a run (empty when there is none)."""
    found = [name for name in RUN_FILES if (run_dir / name).is_file()]
    found += [
        f"{name}/" for name in RUN_DIRS if (run_dir / name).is_dir() and any((run_dir / name).iterdir())
    ]
    return found


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: str) -> None:
    """Fail now, not after the data is built, when run_dir could not be created or written.

    Writes and removes a probe file in run_dir or its nearest existing parent (the only test that
    also holds for root and read-only mounts) and creates nothing, so a rejected run leaves no trace.
    """
    existing = _nearest_existing(Path(run_dir).absolute())
    if not existing.is_dir():
        raise RunDirError(f"run_dir {run_dir} cannot be created: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise RunDirError(
            f"run_dir {run_dir} is not writable: cannot create a file in {existing} ({exc.strerror or exc})"
        ) from None


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, writer: bool) -> None:
    """Check that a run may start in `run_dir`; with `overwrite`, the writer removes the old run first.

    Only the writer (rank 0) removes or creates anything; every rank runs the checks, so all of them
    fail together on bad input.
    """
    if resume and overwrite:
        raise RunDirError(
            "--resume and --overwrite contradict each other: resume continues the run in "
            f"{run_dir}, overwrite replaces it; give one of them"
        )
    existing = holds_run(run_dir) if run_dir.is_dir() else []
    if existing and not resume and not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} already holds a run ({', '.join(existing)}); use --resume to continue it, "
            "--overwrite to replace it, or set another run_dir"
        )
    if not writer:
        return
    try:
        if overwrite:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(run_dir / name, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"run_dir {run_dir} is not writable: {exc.strerror or exc}") from exc
    check_run_dir(str(run_dir))


def check_resumable(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], step: int, total: int
) -> None:
    """Refuse (before anything is written) a resume that would mislabel or misload the checkpoint."""
    if step > total:
        raise CheckpointError(
            f"--resume: the checkpoint is at step {step} but this run has only {total} steps in total "
            f"(train.steps / train.epochs); set at least {step} steps. Nothing was written"
        )
    if saved is None:
        return
    changed = []
    for path in RESUME_FIXED:
        before, now = _get(saved, path), _get(current, path)
        if isinstance(before, Mapping) and isinstance(now, Mapping):  # a whole section: name the leaves
            keys = sorted(set(before) | set(now))
            pairs = [(f"{path}.{k}", before.get(k), now.get(k)) for k in keys]
        else:
            pairs = [(path, before, now)]
        changed += [f"{name}: checkpoint {a!r}, config {b!r}" for name, a, b in pairs if a != b]
    if changed:
        raise CheckpointError(
            "--resume: the config changed what the checkpoint holds (" + "; ".join(changed) + "); resume "
            "with the run's own config.yaml, or start a new run_dir"
        )


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def truncate_records(path: Path, last_step: int) -> None:
    """Drop the JSONL records of steps after `last_step` (written after the resumed checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by the crash
        if step <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
