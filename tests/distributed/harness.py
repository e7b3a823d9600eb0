"""Launching W real processes on a free localhost port, comparing checkpoints with a tolerance, and the
count-sketch matrix rebuilt independently of the engine's codec."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("worker.py")
RTOL, ATOL = 1e-5, 1e-6

# A tiny problem: T = 5 tasks (not divisible by K = 2, 3, 4), an MLP with P ~ 1k shared parameters,
# a global batch of 24 (divisible by D = 2 and by W = 2, 3, 4), one thread per process.
BASE = [
    "data.name=synthetic",
    "data.num_tasks=5",
    "data.input_dim=16",
    "data.train_size=96",
    "data.test_size=32",
    "data.batch_size=24",
    "model.encoder=mlp",
    "model.hidden=[32]",
    "model.rep_dim=16",
    "train.steps=4",
    "train.progress=false",
    "train.threads=1",
    "train.log_every=1",
    "observe.tensorboard=false",
    "optim.name=adam",
    "optim.lr=0.01",
    "engine.checksum_every=1",
    "engine.timeout_s=60",
]


@dataclass
class RankRun:
    """One finished (or killed) rank: exit code, output lines with their arrival times, exit time."""

    returncode: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    ended: float | None = None

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    return {**env, **(extra or {})}


def launch(
    world_size: int,
    argv: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    kill_after: float | None = None,
) -> tuple[list[RankRun], float]:
    """Run `python argv...` as ranks 0..W-1; returns the runs and the launch time (perf_counter).

    Every output line is time-stamped as it arrives. A rank still alive `kill_after` seconds after all
    others have exited (a stalled rank) is killed; so is everything at `timeout`.
    """
    port = free_port()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(r, world_size, port, env),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    runs = [RankRun() for _ in procs]

    def read(proc: subprocess.Popen[str], run: RankRun) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            run.lines.append((time.perf_counter(), line))

    readers = [
        threading.Thread(target=read, args=pair, daemon=True) for pair in zip(procs, runs, strict=True)
    ]
    for t in readers:
        t.start()
    while any(run.ended is None for run in runs):
        now = time.perf_counter()
        for proc, run in zip(procs, runs, strict=True):
            if run.ended is None and proc.poll() is not None:
                run.ended, run.returncode = now, proc.returncode
        others_done = [r.ended for r in runs if r.ended is not None]
        stalled = kill_after is not None and len(others_done) == len(runs) - 1
        if now - started > timeout or (stalled and now - max(others_done) > kill_after):
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.02)
    for t in readers:
        t.join(timeout=5)
    return runs, started


def run_worker(world_size: int, spec: dict[str, Any], path: Path, timeout: float = 240) -> None:
    """Run tests/distributed/worker.py on W ranks with `spec`; fail with every rank's output if any fails."""
    path.write_text(json.dumps(spec))
    runs, _ = launch(world_size, [str(WORKER), str(path)], timeout=timeout)
    failed = [i for i, run in enumerate(runs) if run.returncode != 0]
    assert not failed, "\n".join(
        f"--- rank {i} (exit {runs[i].returncode})\n{runs[i].output}" for i in failed
    )


# Checkpoint fields that differ between two runs of the same training by design: the run's own
# directory and engine layout (in `config`), and its wall-clock time.
RUN_SPECIFIC_CONFIG = ("run_dir", "engine")


def load(path: Path) -> dict[str, Any]:
    """A checkpoint, with its JSON-encoded evaluation history decoded so numbers compare with tolerance.

    The wall-clock time is dropped and so are the run-specific parts of the recorded config; the rest
    of the config must be equal, so a comparison also checks that both runs trained the same thing.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.pop("wall_time_s", None)
    config = {k: v for k, v in json.loads(ckpt.get("config", "{}")).items() if k not in RUN_SPECIFIC_CONFIG}
    return {**ckpt, "history": json.loads(ckpt["history"]), "config": config}


def compare(actual: Any, expected: Any, where: str = "", rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Differences between two checkpoint trees: tensors within (rtol, atol), everything else equal."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"]
        return [
            d for key in expected for d in compare(actual[key], expected[key], f"{where}/{key}", rtol, atol)
        ]
    if isinstance(expected, list | tuple):
        if len(actual) != len(expected):
            return [f"{where}: length {len(actual)} != {len(expected)}"]
        return [
            d
            for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            for d in compare(a, e, f"{where}[{i}]", rtol, atol)
        ]
    if isinstance(expected, torch.Tensor):
        if actual.shape != expected.shape:
            return [f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"]
        if not torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol):
            err = (actual.double() - expected.double()).abs().max()
            return [f"{where}: max abs difference {float(err):.3g}"]
        return []
    if isinstance(expected, float):
        close = math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol)
        return [] if close else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


def read_jsonl(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sketch_matrix(params: int, m: int, seed: int) -> torch.Tensor:
    """S (m x P) with S[h(p), p] = s(p), drawn from the shared seed as the codec documents (buckets, then
    signs): the tests form (S G)(S G)^T with it, independently of the codec's arithmetic."""
    gen = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, m, (params,), generator=gen)
    sign = torch.randint(0, 2, (params,), generator=gen) * 2 - 1
    s = torch.zeros(m, params, dtype=torch.float64)
    s[bucket, torch.arange(params)] = sign.double()
    return s


LAYOUT_KEYS = ("engine.", "train.checkpoint_every")


def single_process_references(
    tmp_path_factory: Any, base: Sequence[str], ignored: tuple[str, ...] = LAYOUT_KEYS
) -> Callable[[list[str]], dict[str, Any]]:
    """A cache of the single-process trainer's final checkpoints (`load`ed) for given overrides on `base`.

    Overrides starting with `ignored` (the layout) are dropped: one process runs the same training.
    """
    from dist_mtl.config import load_config
    from dist_mtl.trainer import train

    done: dict[str, dict[str, Any]] = {}

    def get(overrides: list[str]) -> dict[str, Any]:
        relevant = [o for o in overrides if not o.startswith(ignored)]
        key = json.dumps(relevant)
        if key not in done:
            run_dir = tmp_path_factory.mktemp("reference")
            train(load_config(None, [*base, *relevant, f"run_dir={run_dir}"]))
            done[key] = load(run_dir / "checkpoints" / "last.pt")
        return done[key]

    return get
