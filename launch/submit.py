"""Submit a dist_mtl run through submitit: on SLURM, or locally with the local/debug executors.

    python launch/submit.py CONFIG [section.key=value ...] --executor slurm --nodes 2 --gpus-per-node 8
    python launch/submit.py configs/multidigits_mgda.yaml --executor local      # no SLURM needed

Each SLURM task is one rank (tasks_per_node = gpus_per_node); submitit exports MASTER_ADDR, RANK,
WORLD_SIZE and LOCAL_RANK and every rank runs `python -m dist_mtl.train`'s `main`, as under torchrun.
The config and the layout are checked here, before anything is submitted (one line, exit 2).
Unless --no-wait, the command waits for the job, then prints the run summary, or the failing
rank's error line. submitit's logs go to RUN_DIR/submitit (file names carry the job id). The job
is checkpointable: on preemption or timeout it is requeued with `--resume` and continues from
RUN_DIR/checkpoints/last.pt (set train.checkpoint_every so little work is lost).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from dist_mtl.checkpoint import checkpoint_files
from dist_mtl.config import RunConfig, load_config, split_config_and_overrides
from dist_mtl.errors import ConfigError, UserError

_RANK_ERROR = re.compile(r"dist_mtl\.train: (?:rank \d+: )?error: .*")


def _train_argv(config: str | None, overrides: list[str], resume: bool, overwrite: bool) -> list[str]:
    """The arguments of `python -m dist_mtl.train` for this job."""
    flags = ["--resume"] * resume + ["--overwrite"] * overwrite
    return [*([config] if config else []), *overrides, *flags]


class TrainJob(submitit.helpers.Checkpointable):
    """A picklable training job that resumes from its last checkpoint when requeued."""

    def __call__(
        self, config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False
    ) -> int:
        from dist_mtl.train import main

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main(_train_argv(config, overrides, resume, overwrite))

    def checkpoint(
        self, config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False
    ) -> submitit.helpers.DelayedSubmission:
        """Requeue: resume from the checkpoint, or (none written yet) restart this run from scratch."""
        cfg = load_config(config, overrides)
        # Any checkpoint counts, as for --resume (last.pt is written after step_*.pt): requeueing with
        # --overwrite when only a step_*.pt exists would delete it.
        has_checkpoint = bool(checkpoint_files(cfg.run_dir))
        return submitit.helpers.DelayedSubmission(
            TrainJob(), config, overrides, has_checkpoint, not has_checkpoint
        )


def build_executor(ns: argparse.Namespace, folder: Path) -> submitit.Executor:
    cluster = None if ns.executor == "slurm" else ns.executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, object] = {"timeout_min": ns.timeout_min, "name": ns.name}
    if ns.executor != "debug":
        params |= {
            "nodes": ns.nodes,
            "tasks_per_node": ns.tasks_per_node,
            "gpus_per_node": ns.gpus_per_node,
            "cpus_per_task": ns.cpus_per_task,
        }
    if ns.executor == "slurm":
        if ns.partition:
            params["slurm_partition"] = ns.partition
        params["slurm_signal_delay_s"] = 120
    executor.update_parameters(**params)
    return executor


def log_folder(ns: argparse.Namespace, cfg: RunConfig) -> Path:
    """RUN_DIR/submitit unless --folder; the local executors create the folder literally, so no %j."""
    folder = Path(ns.folder) if ns.folder else Path(cfg.run_dir) / "submitit"
    if ns.executor != "slurm" and "%" in str(folder):
        raise ConfigError(
            f"--folder {folder}: the {ns.executor} executor does not expand %j and the like; submitit "
            "already puts the job id in every log file name, so give a plain directory"
        )
    return folder


def check_before_submission(cfg: RunConfig, world_size: int, *, resume: bool, overwrite: bool) -> None:
    """Reject what would fail on the cluster after the wait in the queue: the layout and the run
    directory (the config itself is checked at load; the device only where the job runs)."""
    from dist_mtl.rundir import check_run_dir, prepare_run_dir
    from dist_mtl.train import check_layout

    if world_size > 1:
        check_layout(cfg, world_size)
    check_run_dir(cfg.run_dir)
    prepare_run_dir(Path(cfg.run_dir), resume=resume, overwrite=overwrite, writer=False)


def report(job: submitit.Job, cfg: RunConfig) -> int:
    """Wait; print the summary, or the failing rank's own error line (not a pickled traceback)."""
    try:
        codes = [int(code or 0) for code in job.results()]
    except submitit.core.utils.UncompletedJobError as exc:
        codes, fallback = [1], (str(exc).strip().splitlines() or ["job failed"])[-1]
    else:
        fallback = f"job {job.job_id} failed with exit code {max(codes)}"
    if max(codes) == 0:
        from dist_mtl.trainer import format_summary

        print(format_summary(json.loads((Path(cfg.run_dir) / "summary.json").read_text())))
        print(f"run directory: {cfg.run_dir}")
        return 0
    errors = dict.fromkeys(_RANK_ERROR.findall(job.stderr() or ""))
    for line in errors or [f"dist-mtl: error: {fallback} (logs: {job.paths.folder})"]:
        print(line, file=sys.stderr)
    return max(codes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    parser.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm")
    parser.add_argument("--folder", default="", help="submitit logs and pickles (default: RUN_DIR/submitit)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument(
        "--tasks-per-node", type=int, default=0, help="ranks per node (default: gpus per node, or 1)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=4)
    parser.add_argument("--partition", default="")
    parser.add_argument("--timeout-min", type=int, default=60)
    parser.add_argument("--name", default="dist_mtl")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the run RUN_DIR already holds")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    ns.tasks_per_node = ns.tasks_per_node or max(ns.gpus_per_node, 1)
    try:
        config, overrides = split_config_and_overrides(ns.args)
        cfg = load_config(config, overrides)
        world_size = ns.nodes * ns.tasks_per_node if ns.executor != "debug" else 1
        check_before_submission(cfg, world_size, resume=ns.resume, overwrite=ns.overwrite)
        folder = log_folder(ns, cfg)
    except UserError as exc:
        print(f"dist-mtl: error: {exc}", file=sys.stderr)
        return 2
    job = build_executor(ns, folder).submit(TrainJob(), config, overrides, ns.resume, ns.overwrite)
    print(f"submitted job {job.job_id} (logs in {folder})", flush=True)
    return 0 if ns.no_wait else report(job, cfg)


if __name__ == "__main__":
    sys.exit(main())
