"""`dist-mtl launch CONFIG [overrides] [options]`: the command line of `dist_mtl.cluster`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_mtl.cluster.options import LaunchOptions, add_launch_arguments, launch_options
from dist_mtl.cluster.submit import log_folder, report, sbatch_script, submit
from dist_mtl.config import RunConfig, load_config, split_config_and_overrides
from dist_mtl.errors import ConfigError

LAUNCH_DESCRIPTION = """\
Submit a run to SLURM through submitit (or run it with submitit's local / debug executor), wait,
and print its summary, or the failing rank's error. One SLURM task per rank: --nodes x
--tasks-per-node ranks. CONFIG and overrides as for `dist-mtl train`. The run directory holds the
submitit logs of every rank (RUN_DIR/submitit), the resolved config, checkpoints and TensorBoard
files. On preemption, `scontrol requeue` or the pre-timeout signal the job checkpoints at the next
step boundary and is requeued; the requeued job resumes from that checkpoint (README: "SLURM").
"""


def check_before_submission(cfg: RunConfig, opts: LaunchOptions, *, resume: bool, overwrite: bool) -> None:
    """Reject what would fail on the cluster after the wait in the queue: the layout, the device and
    the run directory (the config itself is checked at load)."""
    from dist_mtl.rundir import check_run_dir, prepare_run_dir
    from dist_mtl.train import check_layout

    if opts.world_size > 1:
        check_layout(cfg, opts.world_size)
    if opts.executor == "slurm" and cfg.train.device == "cuda" and not opts.gpus_per_node:
        raise ConfigError(
            "train.device=cuda but --gpus-per-node is 0: ask for GPUs, or use train.device=auto"
        )
    check_run_dir(cfg.run_dir)
    prepare_run_dir(Path(cfg.run_dir), resume=resume, overwrite=overwrite, writer=False)


def configure_launch_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_launch_arguments(p)
    p.add_argument(
        "--dry-run", action="store_true", help="check everything and print the sbatch script; submit nothing"
    )
    p.set_defaults(func=launch)
    return p


def add_launch_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`launch` as a sub-command of `dist-mtl`."""
    return configure_launch_parser(
        sub.add_parser(
            "launch",
            help="submit a run to SLURM (submitit), wait, print its summary",
            description=LAUNCH_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def build_launch_parser() -> argparse.ArgumentParser:
    """`launch` on its own (launch/submit.py, and `dist-mtl launch`'s intermixed parsing)."""
    return configure_launch_parser(
        argparse.ArgumentParser(
            prog="dist-mtl launch",
            description=LAUNCH_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def launch(ns: argparse.Namespace) -> int:
    """Check, submit, and (unless --no-wait) wait and report. Raises UserError before submitting."""
    config, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(config, overrides)
    opts = launch_options(ns)
    check_before_submission(cfg, opts, resume=ns.resume, overwrite=ns.overwrite)
    folder = log_folder(opts, cfg)
    if ns.dry_run:
        print(sbatch_script(opts, folder), end="")
        return 0
    job = submit(opts, folder, config, overrides, resume=ns.resume, overwrite=ns.overwrite)
    print(f"submitted job {job.job_id} (logs in {folder})", flush=True)
    return 0 if ns.no_wait else report(job, cfg, opts)
