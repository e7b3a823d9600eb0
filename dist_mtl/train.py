"""Entry point for one process: `python -m dist_mtl.train CONFIG [overrides]`, also under torchrun.

With WORLD_SIZE > 1 (set by torchrun) the run goes through the task-parallel engine; otherwise it
is the single-process trainer, with no collectives at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dist_mtl.config import ConfigError, RunConfig, load_config
from dist_mtl.trainer import format_summary, train


def run(cfg: RunConfig, *, resume: bool = False) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dist_mtl.engine.launch import run_distributed

        return run_distributed(cfg, resume=resume)
    summary = train(cfg, resume=resume)
    print(format_summary(summary))
    print(f"run directory: {cfg.run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dist_mtl.cli import split_config_and_overrides

    parser = argparse.ArgumentParser(prog="python -m dist_mtl.train")
    parser.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args(argv)
    try:
        config, overrides = split_config_and_overrides(ns.args)
        return run(load_config(config, overrides), resume=ns.resume)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"dist_mtl.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
