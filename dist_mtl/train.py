"""Entry point for one process: `python -m dist_mtl.train CONFIG [overrides]`, also under torchrun.

With WORLD_SIZE > 1 (set by torchrun or submitit) this rank joins the task-parallel engine; otherwise
it is the single-process trainer, with no collectives at all. Every check that can reject the run
runs as early as it can: config, device and run directory before any data is built, the layout
before any data is built or process group exists, the batch against the built training split before
training, so bad input fails with the field's name instead of as a collective error on another rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dist_mtl.build import build_source, resolve_device
from dist_mtl.config import RunConfig, check_batch_fits, load_config, split_config_and_overrides
from dist_mtl.data import BatchSource, dataset_num_tasks
from dist_mtl.engine import Engine, Layout, process_group, resolve_layout
from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError
from dist_mtl.engine.compat import LayoutGroups
from dist_mtl.errors import ConfigError, TrainingFailed, UserError
from dist_mtl.restart import attempt_flags
from dist_mtl.rundir import check_run_dir, prepare_run_dir
from dist_mtl.stop import REQUEUE, STOPPED_EXIT, RunStopped, requeue_this_job
from dist_mtl.trainer import format_summary, train


def preflight(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> torch.device:
    """The checks that need neither data nor another process: device, run directory writable, and
    --resume / --overwrite against what the run directory holds (checked only; nothing is written)."""
    device = resolve_device(cfg.train.device)
    check_run_dir(cfg.run_dir)
    prepare_run_dir(Path(cfg.run_dir), resume=resume, overwrite=overwrite, writer=False)
    return device


def num_tasks(cfg: RunConfig) -> int:
    """T as the configured data set would give it, without building the data."""
    d = cfg.data
    return dataset_num_tasks(d.name, tasks=d.tasks, num_tasks=d.num_tasks, path=d.path)


def check_layout(cfg: RunConfig, world_size: int) -> Layout:
    """The D x K layout for `world_size` ranks, checked before any data or process exists."""
    return resolve_layout(cfg, world_size, num_tasks(cfg))


def build_checked_source(cfg: RunConfig) -> BatchSource:
    """The batch source, and the batch checked against the training split's real size (a shard
    directory's is known only now; config-sized splits were checked at load)."""
    source = build_source(cfg)
    check_batch_fits(cfg, source.train_count(), source="as built")
    return source


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    """Train as this process; returns the exit code (0; 1 for a failed collective; STOPPED_EXIT when
    the cluster stopped the run after a checkpoint). Raises UserError."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return run_distributed(cfg, resume=resume, overwrite=overwrite)
        return run_single(cfg, resume=resume, overwrite=overwrite)
    except RunStopped as stopped:
        print(f"dist_mtl.train: {_where()}{stopped}", file=sys.stderr, flush=True)
        if stopped.reason == REQUEUE and int(os.environ.get("RANK", "0")) == 0:
            requeue_this_job()
        return STOPPED_EXIT


def run_single(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    """The single-process trainer, no collectives at all."""
    num_tasks(cfg)  # the task options, checked without building the data
    if cfg.engine.backend != "torch":
        raise ConfigError(
            f"engine.backend {cfg.engine.backend!r} runs the distributed engine: start at least 2 ranks "
            "(dist-mtl train --nproc N); one process trains without a backend"
        )
    preflight(cfg, resume=resume, overwrite=overwrite)
    summary = train(cfg, resume=resume, overwrite=overwrite, datasets=build_checked_source(cfg))
    print(format_summary(summary))
    print(f"run directory: {cfg.run_dir}")
    return 0


def run_distributed(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    """One rank of a D x K layout: checks first, then the data, the process group, engine and trainer."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    layout = check_layout(cfg, world_size)
    device = preflight(cfg, resume=resume, overwrite=overwrite)
    source = build_checked_source(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        with process_group(layout, device, cfg.engine.timeout_s) as mesh:
            engine = build_engine(cfg, layout, mesh, device)
            summary = train(cfg, resume=resume, overwrite=overwrite, backend=engine, datasets=source)
            getattr(engine, "close", lambda: None)()  # DeepSpeed's: a barrier, then its engine freed
    except (CollectiveError, ReplicaDivergenceError) as exc:
        print(f"dist_mtl.train: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        print(format_summary(summary))
        print(
            f"run directory: {cfg.run_dir}  (layout D x K = {layout.replicas} x {layout.task_parallel}, "
            f"protocol {cfg.engine.protocol})"
        )
    return 0


def build_engine(cfg: RunConfig, layout: Layout, mesh: LayoutGroups, device: torch.device) -> Engine:
    """The rank's backend: the torch.distributed engine, or (engine.backend deepspeed, an optional
    extra imported only then) the engine with DeepSpeed stepping the shared encoder."""
    if cfg.engine.backend == "deepspeed":
        from dist_mtl.deepspeed.backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, layout, mesh, device)
    return Engine(cfg, layout, mesh, device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dist_mtl.train",
        description="Train one process (or one rank under torchrun / submitit). CONFIG is a YAML file, "
        "then section.key=value overrides; options may come anywhere.",
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that RUN_DIR already holds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    try:
        config, overrides = split_config_and_overrides(ns.args)
        cfg = load_config(config, overrides)
        resume, overwrite = attempt_flags(cfg.run_dir, ns.resume, ns.overwrite)
        return run(cfg, resume=resume, overwrite=overwrite)
    except (UserError, FileNotFoundError) as exc:  # a missing input file is the user's error too
        print(f"dist_mtl.train: {_where()}error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingFailed as exc:  # the input was fine, the run was not: exit 1, still one line
        print(f"dist_mtl.train: {_where()}error: {exc}", file=sys.stderr, flush=True)
        return 1


def _where() -> str:
    """ "rank R: " in a distributed run, so the launcher's report says which rank failed."""
    rank = os.environ.get("RANK")
    return f"rank {rank}: " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
