"""Entry point for one process: `python -m dist_mtl.train CONFIG [overrides]`, also under torchrun.

With WORLD_SIZE > 1 (set by torchrun or submitit) this rank joins the task-parallel engine; otherwise
it is the single-process trainer, with no collectives at all. Every check that can reject the run
(config, layout, data) runs before a process group exists, so bad input fails with the field's name
instead of as a collective error on another rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from dist_mtl.build import build_datasets, resolve_device
from dist_mtl.config import RunConfig, load_config, split_config_and_overrides
from dist_mtl.engine import Engine, process_group, resolve_layout
from dist_mtl.engine.checksum import ReplicaDivergenceError
from dist_mtl.engine.comm import CollectiveError
from dist_mtl.errors import UserError
from dist_mtl.trainer import format_summary, train


def run(cfg: RunConfig, *, resume: bool = False) -> int:
    """Train as this process; returns the exit code (0; 1 for a failed collective). Raises UserError."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_distributed(cfg, resume=resume)
    summary = train(cfg, resume=resume)
    print(format_summary(summary))
    print(f"run directory: {cfg.run_dir}")
    return 0


def run_distributed(cfg: RunConfig, *, resume: bool = False) -> int:
    """One rank of a D x K layout: checks first, then the process group, the engine and the trainer."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.train.device)
    datasets = build_datasets(cfg)
    layout = resolve_layout(cfg, world_size, len(datasets[0].tasks))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        with process_group(layout, device, cfg.engine.timeout_s) as mesh:
            engine = Engine(cfg, layout, mesh, device)
            summary = train(cfg, resume=resume, backend=engine, datasets=datasets)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_mtl.train")
    parser.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args(argv)
    try:
        config, overrides = split_config_and_overrides(ns.args)
        return run(load_config(config, overrides), resume=ns.resume)
    except (UserError, FileNotFoundError) as exc:  # a missing input file is the user's error too
        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"dist_mtl.train: {where}error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
