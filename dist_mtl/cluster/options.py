"""The options of `dist-mtl launch`, checked before anything is submitted.

Whatever SLURM would reject and can be known here fails with the option's name: a queue wait is
too long a way to learn of a typo. What only the cluster knows (partition names, CPUs per node) is
left to SLURM, whose own message is shown (see `submit.launch`).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from dist_mtl.argtypes import int_at_least
from dist_mtl.errors import ConfigError

EXECUTORS = ("slurm", "local", "debug")
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")


def parse_time_limit(text: str) -> int:
    """SLURM's --time formats, as whole minutes (rounded up: submitit takes minutes)."""
    found = _TIME.match(text.strip())
    if not found:
        raise ConfigError(f"--time {text!r}: expected {TIME_FORMATS}")
    days, a, b, c = (None if v is None else int(v) for v in found.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds, bounded = a, b or 0, c or 0, [(a, 24), (b or 0, 60), (c or 0, 60)]
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds, bounded = a, b, c, [(b, 60), (c, 60)]
    else:  # MM[:SS]: minutes may exceed 59
        hours, minutes, seconds, bounded = 0, a, b or 0, [(b or 0, 60)]
    if any(value >= bound for value, bound in bounded):
        raise ConfigError(
            f"--time {text!r}: a field is out of range (hours < 24 after D-, minutes and seconds < 60)"
        )
    total = (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ConfigError(f"--time {text!r}: the time limit must be positive")
    return math.ceil(total / 60)


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how the job runs; `world_size` ranks in all."""

    executor: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 4
    mem: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 60
    signal_delay_s: int = 120
    name: str = "dist_mtl"
    folder: str = ""

    @property
    def world_size(self) -> int:
        return 1 if self.executor == "debug" else self.nodes * self.tasks_per_node


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm", help="default: %(default)s")
    p.add_argument("--nodes", type=int_at_least(1), default=1, help="nodes (>= 1; default 1)")
    p.add_argument("--gpus-per-node", type=int_at_least(0), default=0, help="GPUs per node (default 0)")
    p.add_argument(
        "--tasks-per-node",
        type=int_at_least(1),
        default=None,
        help="ranks per node (default: GPUs per node, or 1)",
    )
    p.add_argument("--cpus-per-task", type=int_at_least(1), default=4, help="CPUs per rank (default 4)")
    p.add_argument("--mem", default="", help="memory per node as SLURM takes it: 64G, 16000 (MB), 0 (all)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", default="", help="SLURM account to charge")
    p.add_argument("--qos", default="", help="SLURM quality of service")
    p.add_argument("--time", default="01:00:00", help=f"time limit: {TIME_FORMATS} (default 01:00:00)")
    p.add_argument(
        "--signal-delay",
        type=int_at_least(0),
        default=120,
        help="seconds before the time limit at which the job checkpoints and requeues itself (default 120)",
    )
    p.add_argument("--name", default="dist_mtl", help="job name (default dist_mtl)")
    p.add_argument("--folder", default="", help="submitit logs and pickles (default: RUN_DIR/submitit)")
    p.add_argument("--resume", action="store_true", help="continue the run RUN_DIR holds")
    p.add_argument("--overwrite", action="store_true", help="replace the run RUN_DIR already holds")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")


def launch_options(ns: argparse.Namespace) -> LaunchOptions:
    """The checked options; raises ConfigError naming the option."""
    tasks = ns.tasks_per_node if ns.tasks_per_node is not None else max(ns.gpus_per_node, 1)
    if ns.gpus_per_node and tasks > ns.gpus_per_node:
        raise ConfigError(
            f"--tasks-per-node {tasks} is more than --gpus-per-node {ns.gpus_per_node}: each rank needs "
            f"a GPU of its own (use at most {ns.gpus_per_node} tasks per node, or ask for more GPUs)"
        )
    if ns.mem and not _MEM.match(ns.mem):
        raise ConfigError(f"--mem {ns.mem!r}: expected a size such as 64G, 500M or 16000 (MB); 0 means all")
    time_min = parse_time_limit(ns.time)
    if ns.signal_delay >= time_min * 60:
        raise ConfigError(
            f"--signal-delay {ns.signal_delay}s is not shorter than --time {ns.time}: the job would be asked "
            "to stop as it starts"
        )
    if ns.executor != "slurm" and "%" in ns.folder:
        raise ConfigError(
            f"--folder {ns.folder}: the {ns.executor} executor does not expand %j and the like; submitit "
            "already puts the job id in every log file name, so give a plain directory"
        )
    return LaunchOptions(
        executor=ns.executor,
        nodes=ns.nodes,
        gpus_per_node=ns.gpus_per_node,
        tasks_per_node=tasks,
        cpus_per_task=ns.cpus_per_task,
        mem=ns.mem,
        partition=ns.partition,
        account=ns.account,
        qos=ns.qos,
        time_min=time_min,
        signal_delay_s=ns.signal_delay,
        name=ns.name,
        folder=ns.folder,
    )
