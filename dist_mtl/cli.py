"""`dist-mtl` command line: train, launch, profile, report, data."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dist_mtl.argtypes import int_at_least
from dist_mtl.cluster.cli import add_launch_parser, build_launch_parser
from dist_mtl.config import load_config, split_config_and_overrides
from dist_mtl.data.celeba_convert import DEFAULT_SHARD_SIZE
from dist_mtl.errors import TrainingFailed, UserError
from dist_mtl.observe.run_report import add_report_parser
from dist_mtl.restart import attempt_flags
from dist_mtl.train import check_layout, preflight, run

TRAIN_DESCRIPTION = """\
Train. CONFIG is a YAML file (e.g. configs/multidigits_mgda.yaml), then section.key=value
overrides (values parse as YAML: model.hidden=[256,128]); options may come anywhere.
Without CONFIG the defaults apply: the settings of configs/multidigits_mgda.yaml.
Every config key, what it does and its valid values: README.md, section "Configuration", and
dist_mtl/config.py (a comment on every field).
"""

TRAIN_EPILOG = """\
With --nproc N > 1 the config and the D x K layout are checked here, then torchrun starts N local
ranks. SIGTERM or Ctrl-C stops torchrun and every rank; when a rank fails, its error line is
printed last. With --max-restarts R torchrun starts every rank again after a failure, up to R
times, and the run resumes from its last checkpoint (set train.checkpoint_every). Several machines:
run the same command on each with --nnodes M --rdzv-endpoint HOST:PORT (W = M x N ranks).
"""

# torchrun's grace period between its SIGTERM to the ranks and its SIGKILL; ours comes a bit later.
SHUTDOWN_TIMEOUT_S = 10
KILL_AFTER_S = SHUTDOWN_TIMEOUT_S + 5
# How often torchrun polls its ranks. After one fails the others get this long to report what they
# saw (the collective, the step) before torchrun stops them; 0.1 s (torchrun's default) cuts them off.
MONITOR_INTERVAL_S = 1.0
_RANK_ERROR = re.compile(r"dist_mtl\.train: rank \d+: error: .*")
_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")
# torchrun's line for a failed attempt, logged after it has stopped every rank of that attempt.
_ATTEMPT_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
# torch >= 2.5 keeps its agent's TCP store across restarts, so a restarted rank can read the previous
# attempt's gloo / NCCL addresses and fail to connect (pytorch/pytorch#135712); with this set, every
# attempt gets a fresh store on rank 0.
_FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's c10d rendezvous of a multi-node job: `nnodes` agents meet at `endpoint` (HOST:PORT,
    hosted by the agent on HOST); `run_id` names the job (torchrun's default when None)."""

    nnodes: int
    endpoint: str
    run_id: str | None = None

    def torchrun_options(self) -> list[str]:
        return [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            *([f"--rdzv-id={self.run_id}"] if self.run_id else []),
        ]


def torchrun_command(
    nproc: int,
    args: Sequence[str],
    *,
    resume: bool,
    overwrite: bool,
    log_dir: str,
    max_restarts: int = 0,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """torchrun running `python -m dist_mtl.train` on `nproc` local ranks with the same arguments,
    starting the whole group again up to `max_restarts` times when a rank fails; one node
    (`--standalone`) unless a multi-node `rendezvous` is given."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(rendezvous.torchrun_options() if rendezvous else ["--standalone"]),
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        f"--log-dir={log_dir}",  # else torchrun leaves a torchelastic_* directory in TMPDIR
        f"--monitor-interval={MONITOR_INTERVAL_S}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "-m",
        "dist_mtl.train",
        *args,
        *(["--resume"] if resume else []),
        *(["--overwrite"] if overwrite else []),
    ]


def _descendants(root: int) -> list[int]:
    """Every process below `root` (Linux /proc; empty elsewhere). torchrun starts each rank in a
    session of its own, so the ranks are not in torchrun's process group and must be found here."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphaned rank may stay a zombie where PID 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
    except IndexError:
        return True


def _kill(pid: int, signum: int, *, group: bool = False) -> None:
    with suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signum)


class _Relay(threading.Thread):
    """Copies one of torchrun's pipes to ours as bytes arrive (progress bars intact) and keeps the
    ranks' error lines and the end of the text, to report a failure last.

    With `max_restarts` > 0 (torchrun's stderr) it notes each failed attempt that torchrun will
    restart with one line of its own, and forgets that attempt's error lines: a run that fails in
    the end reports the lines of its last attempt."""

    def __init__(self, source: IO[bytes], sink: IO[bytes], max_restarts: int = 0) -> None:
        super().__init__(daemon=True)
        self.source, self.sink = source, sink
        self.max_restarts = max_restarts
        self.restarts = 0
        self.errors: list[str] = []
        self.tail = ""
        self._partial = b""

    def run(self) -> None:
        fd = self.source.fileno()
        while chunk := os.read(fd, 65536):
            self.sink.write(chunk)
            self.sink.flush()
            self._scan(chunk)

    def _scan(self, chunk: bytes) -> None:
        *lines, self._partial = re.split(rb"[\r\n]", self._partial + chunk)
        for raw in lines:
            line = raw.decode(errors="replace")
            found = _RANK_ERROR.search(line)
            if found and found.group(0) not in self.errors:
                self.errors.append(found.group(0))
            failed = _ATTEMPT_FAILED.search(line) if self.max_restarts else None
            if failed and self.restarts < self.max_restarts:
                self.restarts += 1
                self.errors.clear()
                code, rank = failed.groups()
                notice = (
                    f"dist-mtl: local rank {rank} failed (exit code {code}); torchrun restarts every rank "
                    f"(restart {self.restarts} of {self.max_restarts}), resuming from the last checkpoint\n"
                )
                self.sink.write(notice.encode())
                self.sink.flush()
        self.tail = (self.tail + chunk.decode(errors="replace"))[-20000:]


class _Supervisor:
    """Waits for torchrun; on SIGTERM / SIGINT forwards the signal to it, and after KILL_AFTER_S (or
    a second signal) SIGKILLs torchrun's group and every rank, so no rank outlives the command."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.signum: int | None = None
        self.deadline = float("inf")
        self.ranks: set[int] = set()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.ranks |= set(_descendants(self.proc.pid))
        if self.signum is not None:  # a second Ctrl-C: stop now
            self.deadline = 0.0
            return
        self.signum, self.deadline = signum, time.monotonic() + KILL_AFTER_S
        _kill(self.proc.pid, signum, group=True)

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _kill_all(self) -> None:
        self.ranks |= set(_descendants(self.proc.pid))
        _kill(self.proc.pid, signal.SIGKILL, group=True)
        for pid in self.ranks:
            _kill(pid, signal.SIGKILL)

    def wait(self) -> int:
        while True:
            try:
                code = self.proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > self.deadline:
                    self._kill_all()
        if self.signum is not None:  # torchrun is gone; its ranks must follow within the bound
            while any(_alive(p) for p in self.ranks) and time.monotonic() < self.deadline:
                time.sleep(0.1)
            self._kill_all()
        return code


def _report_failure(stderr: _Relay) -> None:
    """Print what failed as the last line: the ranks' own error lines, else torchrun's root cause."""
    if stderr.errors:
        for line in stderr.errors:
            print(line, file=sys.stderr, flush=True)
        return
    cause = _ROOT_CAUSE.search(stderr.tail.rpartition("Root Cause")[2])
    if cause:
        rank, code = cause.groups()
        print(
            f"dist-mtl: error: rank {rank} exited with code {code} (torchrun's first observed failure); "
            "its output is above",
            file=sys.stderr,
            flush=True,
        )


def run_torchrun(
    nproc: int,
    args: Sequence[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    max_restarts: int = 0,
    rendezvous: Rendezvous | None = None,
) -> int:
    """Run `nproc` ranks under torchrun in its own session, relay their output, stop them on a signal.

    torchrun gets a private log directory, removed afterwards. Returns torchrun's exit code, or
    128 + the signal number when stopped by a signal.
    """
    log_dir = tempfile.mkdtemp(prefix="dist-mtl-torchrun-")
    cmd = torchrun_command(
        nproc,
        args,
        resume=resume,
        overwrite=overwrite,
        log_dir=log_dir,
        max_restarts=max_restarts,
        rendezvous=rendezvous,
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if max_restarts:
        env.setdefault(_FRESH_STORE_ENV, "1")
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        if proc.stdout is None or proc.stderr is None:  # cannot happen with PIPE; narrows the types
            raise RuntimeError("torchrun was started without output pipes")
        relays = [
            _Relay(proc.stdout, sys.stdout.buffer),
            _Relay(proc.stderr, sys.stderr.buffer, max_restarts=max_restarts),
        ]
        for relay in relays:
            relay.start()
        supervisor = _Supervisor(proc)
        with supervisor.handling_signals():
            code = supervisor.wait()
        for relay in relays:
            relay.join(timeout=5)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    if supervisor.signum is not None:
        name = signal.Signals(supervisor.signum).name
        print(f"dist-mtl: stopped by {name}: torchrun and every rank have exited", file=sys.stderr)
        return 128 + supervisor.signum
    if code != 0:
        _report_failure(relays[1])
    return code


def _train(ns: argparse.Namespace) -> int:
    config, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(config, overrides)
    rendezvous = _rendezvous(ns)
    # A requeued SLURM job runs this same command line again: it resumes (see dist_mtl.restart).
    resume, overwrite = attempt_flags(cfg.run_dir, ns.resume, ns.overwrite)
    if ns.nproc == 1 and ns.max_restarts == 0 and rendezvous is None:
        return run(cfg, resume=resume, overwrite=overwrite)
    check_layout(cfg, ns.nproc * ns.nnodes)
    preflight(cfg, resume=resume, overwrite=overwrite)
    args = [*([config] if config else []), *overrides]
    return run_torchrun(
        ns.nproc,
        args,
        resume=resume,
        overwrite=overwrite,
        max_restarts=ns.max_restarts,
        rendezvous=rendezvous,
    )


def _rendezvous(ns: argparse.Namespace) -> Rendezvous | None:
    """The multi-node rendezvous that --nnodes / --rdzv-endpoint / --rdzv-id ask for, or None."""
    if ns.rdzv_endpoint is None:
        if ns.nnodes > 1:
            raise UserError(
                f"--nnodes {ns.nnodes} needs --rdzv-endpoint HOST:PORT (a free port on one of the "
                "nodes, the same on every node)"
            )
        if ns.rdzv_id is not None:
            raise UserError("--rdzv-id needs --rdzv-endpoint HOST:PORT")
        return None
    return Rendezvous(ns.nnodes, ns.rdzv_endpoint, ns.rdzv_id)


def _endpoint(text: str) -> str:
    """An argparse type: HOST:PORT with a port in 1..65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535; got {text!r}")
    return text


_endpoint.__name__ = "HOST:PORT"


def _profile(ns: argparse.Namespace) -> int:
    from dist_mtl.observe import profile_report

    print(profile_report(ns.run_dir, warmup=ns.warmup))
    return 0


def _data_celeba(ns: argparse.Namespace) -> int:
    from dist_mtl.data.celeba_convert import convert_celeba

    manifest = convert_celeba(ns.root, ns.out, image_size=ns.image_size, shard_size=ns.shard_size)
    print(f"wrote {manifest}")
    return 0


def _data_arrays(ns: argparse.Namespace) -> int:
    from dist_mtl.data.arrays_convert import convert_arrays

    manifest = convert_arrays(
        ns.inputs,
        ns.labels,
        ns.out,
        test_inputs=ns.test_inputs,
        test_labels=ns.test_labels,
        test_fraction=ns.test_fraction,
        val_fraction=ns.val_fraction,
        seed=ns.seed,
        shard_size=ns.shard_size,
    )
    print(f"wrote {manifest}")
    return 0


DATA_ARRAYS_DESCRIPTION = """\
Convert your own arrays into webdataset shards plus manifest.json (format dist_mtl-shards/1, as
`dist-mtl data celeba` writes). Inputs: one .npy of shape (N, C, H, W), or (N, H, W) for one
channel, dtype uint8 or float32 (memory-mapped, each sample stored exactly). Labels: an .npz with
one integer array of N labels per task (task name = array name), or a .csv with a header of task
names and one row per sample; -1 or an empty cell means "no label for this task". The test split is
a separate pair of files (--test-inputs/--test-labels) or a seeded random fraction of the rows
(--test-fraction); one of the two is required.
"""


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run that RUN_DIR already holds (else an error)"
    )
    p.add_argument(
        "--nproc", type=int_at_least(1), default=1, help="launch this many local ranks with torchrun (>= 1)"
    )
    p.add_argument(
        "--max-restarts",
        type=int_at_least(0),
        default=0,
        metavar="R",
        help="when a rank fails, torchrun restarts every rank up to R times; each restart resumes "
        "from the run's last checkpoint (train.checkpoint_every). With --nproc 1 and R > 0 the one "
        "rank runs under torchrun too (default: 0)",
    )
    p.add_argument(
        "--nnodes",
        type=int_at_least(1),
        default=1,
        metavar="M",
        help="machines of a multi-node job: run the same command on each, with --rdzv-endpoint "
        "(--nproc ranks per machine; default: 1)",
    )
    p.add_argument(
        "--rdzv-endpoint",
        type=_endpoint,
        default=None,
        metavar="HOST:PORT",
        help="torchrun's c10d rendezvous of a multi-node job: a free port on HOST, one of the nodes, "
        "whose agent hosts it; the same on every node",
    )
    p.add_argument(
        "--rdzv-id", default=None, metavar="ID", help="the job's rendezvous id, the same on every node"
    )
    p.set_defaults(func=_train)


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `dist-mtl` parser and its `train` sub-parser (parsed on its own: see `parse_args`)."""
    parser = argparse.ArgumentParser(prog="dist-mtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train; CONFIG is a YAML file, then section.key=value overrides",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_arguments(train)

    p = sub.add_parser("profile", help="per-phase p50/p95 times, shares and bytes of a run")
    p.add_argument("run_dir")
    p.add_argument("--warmup", type=int, default=2, help="steps skipped at the start of each rank's log")
    p.set_defaults(func=_profile)

    add_report_parser(sub)
    add_launch_parser(sub)

    p = sub.add_parser("data", help="data preparation")
    dsub = p.add_subparsers(dest="dataset", required=True)
    c = dsub.add_parser("celeba", help="convert a local CelebA copy into webdataset shards")
    c.add_argument("root", help="CelebA root (official layout or torchvision's)")
    c.add_argument("out", help="output directory for shards and manifest.json")
    c.add_argument("--image-size", type=int, default=None, help="resize to this square size (default: keep)")
    c.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (default: %(default)s)"
    )
    c.set_defaults(func=_data_celeba)
    a = dsub.add_parser(
        "arrays",
        help="convert .npy inputs and .npz/.csv labels into webdataset shards",
        description=DATA_ARRAYS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("--inputs", required=True, help="inputs .npy, (N, C, H, W) or (N, H, W), uint8 or float32")
    a.add_argument("--labels", required=True, help="labels .npz (an array per task) or .csv (header: tasks)")
    a.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    a.add_argument("--test-inputs", default=None, help="test set inputs .npy (with --test-labels)")
    a.add_argument("--test-labels", default=None, help="test set labels .npz or .csv, the same task names")
    a.add_argument(
        "--test-fraction", type=float, default=None, help="hold out this fraction of rows as test split"
    )
    a.add_argument(
        "--val-fraction", type=float, default=None, help="also hold out this fraction as val split"
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the random row split (default: %(default)s)")
    a.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per shard (default: shards of about 32 MB, at least 16 per split)",
    )
    a.set_defaults(func=_data_arrays)
    return parser, train


def build_parser() -> argparse.ArgumentParser:
    return build_parsers()[0]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`train` and `launch` options and overrides may come in any order
    (`CONFIG --nproc 2 key=value --resume`).

    argparse's intermixed parsing does not support sub-parsers, so those two are parsed on their own.
    """
    parser, train = build_parsers()
    intermixed = {"train": lambda: train, "launch": build_launch_parser}
    if argv and argv[0] in intermixed:
        ns = intermixed[argv[0]]().parse_intermixed_args(argv[1:])
        ns.command = argv[0]
        return ns
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return ns.func(ns)
    except (UserError, FileNotFoundError) as exc:  # a missing input file is the user's error too
        print(f"dist-mtl: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:  # the input was fine, the run was not: exit 1, still one line
        print(f"dist-mtl: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
