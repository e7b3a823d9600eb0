"""Submit a dist_mtl run through submitit: on SLURM, or locally with the local/debug executors.

    python launch/submit.py CONFIG [section.key=value ...] --executor slurm --nodes 2 --gpus-per-node 8
    python launch/submit.py configs/multidigits_mgda.yaml --executor local      # no SLURM needed

Each SLURM task is one rank (tasks_per_node = gpus_per_node); submitit exports MASTER_ADDR, RANK,
WORLD_SIZE and LOCAL_RANK and the run goes through the same `dist_mtl.train.run` as torchrun. The
job is checkpointable: on preemption or timeout it is requeued with `--resume`, and continues from
RUN_DIR/checkpoints/last.pt (set train.checkpoint_every so little work is lost).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from dist_mtl.config import load_config, split_config_and_overrides


class TrainJob(submitit.helpers.Checkpointable):
    """A picklable training job that resumes from its last checkpoint when requeued."""

    def __call__(self, config: str | None, overrides: list[str], resume: bool = False) -> int:
        from dist_mtl.train import run

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = load_config(config, overrides)
        return run(cfg, resume=resume)

    def checkpoint(self, config: str | None, overrides: list[str], resume: bool = False):
        cfg = load_config(config, overrides)
        has_checkpoint = (Path(cfg.run_dir) / "checkpoints" / "last.pt").is_file()
        return submitit.helpers.DelayedSubmission(TrainJob(), config, overrides, has_checkpoint)


def build_executor(ns: argparse.Namespace) -> submitit.Executor:
    cluster = None if ns.executor == "slurm" else ns.executor
    executor = submitit.AutoExecutor(folder=ns.folder, cluster=cluster)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    parser.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm")
    parser.add_argument("--folder", default="runs/submitit/%j", help="submitit logs (%%j = job id)")
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
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    ns = parser.parse_args(argv)
    ns.tasks_per_node = ns.tasks_per_node or max(ns.gpus_per_node, 1)
    config, overrides = split_config_and_overrides(ns.args)
    load_config(config, overrides)  # fail here, not on the cluster, on a bad config
    job = build_executor(ns).submit(TrainJob(), config, overrides, ns.resume)
    print(f"submitted job {job.job_id} (logs in {ns.folder.replace('%j', str(job.job_id))})")
    if ns.no_wait:
        return 0
    results = job.results()
    return max(int(r or 0) for r in results)


if __name__ == "__main__":
    sys.exit(main())
