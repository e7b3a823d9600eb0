"""A real single-node SLURM for tests: slurmctld, slurmd and a private munged under one directory.

Everything the cluster writes (slurm.conf, the munge key and socket, state, spool, PID and log files,
job logs) lies under that directory, on TCP ports picked at start, so it neither needs nor touches a
system SLURM or munge configuration, and several clusters (pytest-xdist workers) can run side by side.
The node (this machine, `hostname -s`, at 127.0.0.1) declares 8 CPUs whatever the hardware has
(SlurmdParameters=config_overrides), shared by jobs CPU by CPU (select/cons_tres, CR_CPU). There is
no accounting (no slurmdbd, no sacct): finished jobs stay visible to `scontrol show job` for
MinJobAge=600 s, which is where job states and restart counts are read from.

Requeued jobs wait AuthInfo cred_expire + 1 seconds before they may start again (SLURM lets the old
attempt's credential expire first; 120 s by default, 5 here), and the scheduler runs every second,
so a requeued job runs again about 6 s after `scontrol requeue`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
PROGRAMS = (
    "slurmctld",
    "slurmd",
    "sinfo",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "squeue",
    "munged",
    "munge",
    "unmunge",
)
# The states a job leaves no more (without a requeue): `wait` returns at the first of them.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
# The daemons live in /usr/sbin, which a non-root PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
CRED_EXPIRE_S = 5  # the least SLURM accepts ("AuthInfo=cred_expire=2 invalid": 120 s then)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class SlurmUnavailable(Exception):
    """SLURM cannot run here for a reason that is no bug (tests that need it are skipped)."""


class SlurmError(RuntimeError):
    """A SLURM command or daemon failed; the message holds its output and the daemons' log tails."""


def which(program: str) -> str | None:
    return shutil.which(program, path=SEARCH_PATH)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def ensure_installed() -> None:
    """Install the Debian packages when a program is missing: as root, a failed install raises
    SlurmError with apt's output (CI must run the SLURM tests); otherwise SlurmUnavailable."""
    missing = missing_programs()
    if not missing:
        return
    install = ["apt-get", "install", "-y", *PACKAGES]
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"SLURM is not installed ({', '.join(missing)} not found) and installing it needs root: "
            f"`{' '.join(install)}`"
        )
    if which("apt-get") is None:
        raise SlurmError(f"SLURM is not installed ({', '.join(missing)} not found) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SEARCH_PATH}
    for command in (["apt-get", "update"], install):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as err:
            raise SlurmError(f"`{' '.join(command)}` took over {err.timeout} s") from err
        if done.returncode != 0:
            raise SlurmError(
                f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
                f"{_tail(done.stdout, 40)}\n{_tail(done.stderr, 40)}"
            )
    missing = missing_programs()
    if missing:
        raise SlurmError(f"{', '.join(missing)} still not found after `{' '.join(install)}`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_hostname() -> str:
    """`hostname -s`: the name slurmd looks itself up by in slurm.conf."""
    return socket.gethostname().split(".")[0]


def parse_job(line: str) -> dict[str, str]:
    """The fields of one `scontrol show job -o` line. Values hold no spaces except Command's
    arguments (which may look like key=value), so the first occurrence of a key wins."""
    fields: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


class SlurmCluster:
    """A single-node SLURM under `root`: `start()`, submit jobs with `sbatch`, `stop()`.

    Every command runs with `env`: this process's environment without any inherited SLURM_*/SBATCH_*/
    SRUN_* variables, with SLURM_CONF pointing at this cluster's slurm.conf and the running Python's
    bin directory first on PATH (jobs inherit the submitter's environment, so `python`, `torchrun`
    and `scontrol` inside a job are the ones the tests use).
    """

    def __init__(self, root: Path, *, cpus: int = 8, partition: str = "debug") -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.partition = partition
        self.node = short_hostname()
        self.conf_path = self.root / "slurm.conf"
        self.job_dir = self.root / "jobs"
        self.env = self._environment()
        self._procs: dict[str, subprocess.Popen] = {}
        self._munge_dir: Path | None = None
        self._private_munge_dir = False
        self.start_time_s: float | None = None

    # ---- lifetime ---------------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), SEARCH_PATH])
        return env

    @property
    def munge_socket(self) -> Path:
        assert self._munge_dir is not None
        return self._munge_dir / "munge.socket"

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle. On failure everything
        started so far is stopped and SlurmError carries the daemons' log tails."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("the SLURM test cluster runs slurmd, which needs root")
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_time_s = time.monotonic() - began
        return self

    def _start(self) -> None:
        for sub in ("state", "spool", "log", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf_path.write_text(self.slurm_conf(free_port(), free_port()))
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf_path)])
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf_path), "-N", self.node])
        self._wait_idle(START_TIMEOUT_S)

    def _start_munge(self) -> None:
        # AF_UNIX socket paths are limited to 107 bytes: a long tmp root gets a short directory.
        self._munge_dir = self.root / "munge"
        if len(str(self._munge_dir / "munge.socket")) > 100:
            self._munge_dir = Path(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
            self._private_munge_dir = True
        self._munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self._munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        munged = [
            which("munged"),
            "--foreground",
            "--force",  # it refuses to run as root otherwise
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self._munge_dir / 'munged.pid'}",
            f"--seed-file={self._munge_dir / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
        ]
        self._spawn("munged", munged)
        deadline = time.monotonic() + 10
        while True:
            encoded = subprocess.run(
                [which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True, env=self.env
            )
            if encoded.returncode == 0:
                decoded = subprocess.run(
                    [which("unmunge"), "-S", str(self.munge_socket)],
                    input=encoded.stdout,
                    capture_output=True,
                    env=self.env,
                )
                if decoded.returncode == 0:
                    return
            if time.monotonic() > deadline or self._procs["munged"].poll() is not None:
                raise SlurmError(
                    "munged does not answer `munge -n | unmunge`:\n"
                    + encoded.stderr.decode(errors="replace")
                    + self.logs()
                )
            time.sleep(0.1)

    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        r = self.root
        user = "root"
        return f"""\
# slurm.conf of a single-node test cluster (tests/slurm/cluster.py)
ClusterName=pytest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=20
ReturnToService=2
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1024 State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: Sequence[str | None]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the daemon keeps it)
        try:
            self._procs[name] = subprocess.Popen(
                [str(a) for a in argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{name} exited with code {proc.returncode} while starting\n{self.logs()}"
                    )
            done = subprocess.run(
                [which("sinfo"), "-h", "-N", "-n", self.node, "-o", "%T"],
                capture_output=True,
                text=True,
                env=self.env,
            )
            state = done.stdout.strip() or done.stderr.strip()
            if done.returncode == 0 and state == "idle":
                return
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"node {self.node} not idle after {timeout_s:.0f} s: {state!r}\n{self.logs()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged (SIGTERM, SIGKILL after a bound), and
        kill whatever process of this cluster is left (job steps, their processes)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld"):
            self._terminate(name)
        self._kill_leftovers()
        self._terminate("munged")
        if self._private_munge_dir and self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)

    def _cancel_all_jobs(self) -> None:
        jobs = subprocess.run(
            [which("squeue"), "-h", "-o", "%i"], capture_output=True, text=True, env=self.env
        ).stdout.split()
        if not jobs:
            return
        subprocess.run([which("scancel"), "--signal=KILL", *jobs], capture_output=True, env=self.env)
        subprocess.run([which("scancel"), *jobs], capture_output=True, env=self.env)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            left = subprocess.run(
                [which("squeue"), "-h", "-o", "%i"], capture_output=True, text=True, env=self.env
            ).stdout.split()
            if not left:
                return
            time.sleep(0.2)

    def _terminate(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def _kill_leftovers(self) -> None:
        """SIGKILL the processes still running with this cluster's SLURM_CONF in their environment:
        slurmstepd (it inherits slurmd's) and job processes (they inherit the submitter's)."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        mine = {os.getpid(), os.getppid()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in mine:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- commands ---------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment; with `check`, a failure raises SlurmError."""
        program = which(argv[0]) or argv[0]
        done = subprocess.run(
            [program, *argv[1:]], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and done.returncode != 0:
            raise SlurmError(
                f"`{' '.join(argv)}` failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args).stdout

    def scancel(self, *args: str) -> str:
        return self.run("scancel", *args).stdout

    def sbatch(
        self,
        args: Sequence[str] = (),
        script: str | os.PathLike[str] | None = None,
        *,
        wrap: str | None = None,
        script_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Submit `script` (with `script_args`) or `wrap` with the sbatch options `args`; the job id.
        Unless `args` names an output file, the job's log is JOB_DIR/<name>-<id>.out (not the
        submission directory). `env` adds variables to the submitter's (and so the job's) environment."""
        if (script is None) == (wrap is None):
            raise ValueError("sbatch needs a script or wrap, not both")
        options = ["--parsable", *args]
        if not any(a in ("-o", "--output") or a.startswith(("-o", "--output=")) for a in args):
            options.append(f"--output={self.job_dir / '%x-%j.out'}")
        command = ["sbatch", *options]
        command += ["--wrap", wrap] if wrap is not None else [str(script), *script_args]
        done = subprocess.run(
            [which("sbatch"), *command[1:]],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=60,
        )
        if done.returncode != 0:
            raise SlurmError(f"`{' '.join(command)}` failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip().split(";")[0]

    # ---- jobs -------------------------------------------------------------------------------------

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o JOB` as a dict (JobState, Restarts, StdOut, ExitCode, ...)."""
        return parse_job(self.scontrol("show", "job", "-o", str(job_id)))

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id)["JobState"]

    def restarts(self, job_id: str) -> int:
        """How many times the job was requeued (scontrol's Restarts; SLURM_RESTART_COUNT in the job)."""
        return int(self.job_info(job_id)["Restarts"])

    def job_output(self, job_id: str, lines: int = 40) -> str:
        """The tails of the job's stdout and stderr files."""
        info = self.job_info(job_id)
        paths = dict.fromkeys(info.get(k) for k in ("StdOut", "StdErr"))
        parts = []
        for path in filter(None, paths):
            try:
                text = Path(path).read_text(errors="replace")
            except OSError as err:
                text = f"({err})"
            parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(text, lines)}")
        return "\n".join(parts)

    def describe(self, job_id: str, lines: int = 40) -> str:
        """The job's scontrol line and log tails: what an assertion about the job should show."""
        try:
            line = self.scontrol("show", "job", "-o", str(job_id)).strip()
            return f"job {job_id}: {line}\n{self.job_output(job_id, lines)}"
        except SlurmError as err:
            return f"job {job_id}: {err}"

    def wait_for(self, job_id: str, states: Iterable[str], timeout_s: float = 60) -> str:
        """Poll until the job is in one of `states`; its state. SlurmError on a timeout or when the
        job reaches a terminal state that is not wanted."""
        wanted = set(states)
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmError(f"job {job_id} ended {state}, not {sorted(wanted)}\n{self.describe(job_id)}")
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} not {sorted(wanted)} after {timeout_s:.0f} s\n{self.describe(job_id)}"
                )
            time.sleep(0.2)

    def wait(self, job_id: str, timeout_s: float = 60, *, expect: str | None = None) -> str:
        """Poll until the job reaches a terminal state and return it (a requeued job's intermediate
        states are not terminal). SlurmError on a timeout; AssertionError when `expect` is given and
        the state differs. Both messages carry the job's scontrol line and log tails."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} still {state} after {timeout_s:.0f} s\n{self.describe(job_id)}"
                )
            time.sleep(0.2)
        if expect is not None and state != expect:
            raise AssertionError(f"job {job_id} ended {state}, expected {expect}\n{self.describe(job_id)}")
        return state

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(text, lines)}")
        return "\n".join(parts)
