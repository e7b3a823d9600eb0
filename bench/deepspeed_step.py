"""engine.backend deepspeed beside the torch backend: step time and per-rank memory, side by side.

Same model, batch and layout for every row, 2 ranks (gloo, one thread each), Adam, MGDA: a 3-layer MLP
encoder (3072 -> 1024 -> 1024 -> 256, 4.4M shared parameters), T = 4 binary heads, batch 64 of
3 x 32 x 32. Exact mode runs `gramian` on 1 x 2 (each rank back-propagates 2 tasks; the torch backend
with and without engine.shard_optimizer, its ZeRO-1 for gramian); rep mode (MGDA-UB) runs on 2 x 1.
DeepSpeed rows run ZeRO 0-3 through the same protocols (dist_mtl.deepspeed.backend: the protocol's d,
then a surrogate backward and DeepSpeed's step).

Per rank, after the measured steps:
- params: bytes of the model's parameters plus DeepSpeed's own: its float32 master partition, and its
  module copy where the model does not share it (ZeRO 3: 1/W of it; bf16);
- opt state: every tensor in the optimizer states (the trainer's, the sharded optimizer's, DeepSpeed's);
- held: bytes allocated since the variant started building and still alive after its steps, from the
  allocator's events (torch.profiler, profile_memory; the main thread, where every step runs): the
  model, the engine's and DeepSpeed's buffers (gradients, buckets) and the optimizer state;
- grads + buffers: held less params and opt state: the gradient buffers (the protocol's, DeepSpeed's
  partitions and buckets) and the engine's other buffers;
- peak: the most allocated at once during a step (held plus the step's temporaries).
"sent" is the median of what a rank wrote to its sockets during a step (/proc/self/io wchar).
Step time is the median over the measured steps of the slower rank; the rows are timed in interleaved
rounds of 4 steps each, and "x torch" divides a row's time by the torch backend's (shard_optimizer off)
in the same mode, measured in the same rounds.

Run: python3 bench/deepspeed_step.py [--steps 20] [--warmup 3] [--json FILE]   (about 2.5 min on 2 cores;
needs the deepspeed extra: pip install --no-build-isolation -e '.[deepspeed]')
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_mtl.balancers import build_balancer  # noqa: E402
from dist_mtl.build import build_optimizer  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.memory import part_rows  # noqa: E402
from dist_mtl.engine.launch import device_mesh, process_group  # noqa: E402
from dist_mtl.engine.layout import resolve_layout  # noqa: E402
from dist_mtl.models import MultiTaskModel  # noqa: E402
from dist_mtl.models.encoders import MLPEncoder  # noqa: E402
from dist_mtl.observe import StepRecorder  # noqa: E402
from dist_mtl.train import build_engine  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from step import run_ranks  # noqa: E402

CPU = torch.device("cpu")
WORLD, TASKS, BATCH, INPUT = 2, 4, 64, (3, 32, 32)
HIDDEN, REP_DIM = [1024, 1024], 256
ROUND = 4  # steps of one row per timing round
COMMON = [
    "balancer.name=mgda",
    "optim.name=adam",
    "optim.lr=0.001",
    "engine.checksum_every=0",
    f"data.num_tasks={TASKS}",
    f"data.batch_size={BATCH}",
]
MODES = {
    "exact": ["train.mode=exact", "engine.protocol=gramian", f"engine.task_parallel={WORLD}"],
    "rep": ["train.mode=rep", "engine.protocol=rep", "engine.task_parallel=1"],
}
# (mode, row name, overrides); the first row of each mode is the baseline of "x torch"
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("exact", "torch", ["engine.shard_optimizer=false"]),
    ("exact", "torch shard_optimizer", ["engine.shard_optimizer=true"]),
    *[
        ("exact", f"deepspeed ZeRO {z}", ["engine.backend=deepspeed", f"engine.zero_stage={z}"])
        for z in range(4)
    ],
    ("rep", "torch", []),
    *[
        ("rep", f"deepspeed ZeRO {z}", ["engine.backend=deepspeed", f"engine.zero_stage={z}"])
        for z in (1, 2, 3)
    ],
]


def build_model() -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = MLPEncoder(INPUT, HIDDEN, REP_DIM)
    return MultiTaskModel(encoder, [nn.Linear(encoder.out_dim, 2) for _ in range(TASKS)])


def written_bytes() -> int:
    """What this process has written (/proc/self/io wchar): gloo sends with writev, so a step's delta is
    the bytes it sent, DeepSpeed's collectives included (they bypass the engine's accounting)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(optimizer: Any) -> int:
    state = getattr(optimizer, "state", {})
    return tensor_bytes(v for s in state.values() for v in s.values())


def deepspeed_bytes(engine: Any) -> tuple[int, int]:
    """(DeepSpeed's parameter bytes: its module copy (its partition under ZeRO 3) and float32 master
    partitions; its optimizer-state bytes); (0, 0) for the torch backend."""
    ds = getattr(engine, "ds_engine", None)
    if ds is None:
        return 0, 0
    # ZeRO 0-2 in float32: the model's parameters are views of DeepSpeed's, counted once
    module = [] if engine.aliased else [getattr(p, "ds_tensor", p) for p in ds.module.parameters()]
    masters = engine._masters() if engine._partitioned() else []
    return tensor_bytes(module) + tensor_bytes(masters), state_bytes(engine._inner())


class Variant:
    """One row, built and kept alive so that the timing rounds can interleave every row."""

    def __init__(self, overrides: list[str], mesh: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """Build the model, optimizer and step under the allocator's profiler, then 2 steps: the bytes."""
        from torch.profiler import ProfilerActivity, profile

        cfg = load_config(None, overrides)
        self.engine = build_engine(cfg, resolve_layout(cfg, WORLD, TASKS), mesh, CPU)
        rows = part_rows(len(x), self.engine.data_part)
        self.x, self.y = x[rows], y[rows]
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.model = build_model()
            self.optimizer = build_optimizer(cfg, list(self.model.parameters()))
            self.step = self.engine.make_step(cfg, self.model, build_balancer("mgda"), self.optimizer)
            for _ in range(2):
                self.run()
        events = prof.profiler.kineto_results.events()
        self.live = self.peak = 0
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.times: list[float] = []
        self.written: list[int] = []

    def run(self) -> None:
        self.step(self.x, self.y, StepRecorder())

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            dist.barrier()
            written = written_bytes()
            start = time.perf_counter()
            self.run()
            self.times.append(time.perf_counter() - start)
            self.written.append(written_bytes() - written)

    def result(self) -> dict:
        ds_params, ds_state = deepspeed_bytes(self.engine)
        params = tensor_bytes(self.model.parameters()) + ds_params
        opt_state = state_bytes(getattr(self.step, "optimizer", self.optimizer)) + ds_state
        return {
            "step_s": statistics.median(self.times),
            "sent": statistics.median(self.written),
            "params": params,
            "opt_state": opt_state,
            "grads_buffers": self.live - params - opt_state,
            "held": self.live,
            "peak": self.peak,
            "shared_params": sum(p.numel() for p in self.model.shared_parameters()),
        }


def worker(spec_path: str) -> None:
    """One rank: every row built (its bytes measured), then timed in interleaved rounds, so a change of
    the machine's load during the run hits every row alike."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *INPUT, generator=gen)
    y = torch.randint(0, 2, (BATCH, TASKS), generator=gen)
    exact_layout = resolve_layout(load_config(None, [*COMMON, *MODES["exact"]]), WORLD, TASKS)
    with process_group(exact_layout, CPU, 120.0) as mesh:
        rep_layout = resolve_layout(load_config(None, [*COMMON, *MODES["rep"]]), WORLD, TASKS)
        meshes = {"exact": mesh, "rep": device_mesh(rep_layout, CPU, 120.0)}
        variants = {
            f"{mode}/{name}": Variant([*COMMON, *MODES[mode], *overrides], meshes[mode], x, y)
            for mode, name, overrides in VARIANTS
        }
        for v in variants.values():
            for _ in range(spec["warmup"]):
                v.run()
        rounds = max(1, spec["steps"] // ROUND)
        for _ in range(rounds):
            for v in variants.values():
                v.timed(ROUND)
        results = {key: v.result() for key, v in variants.items()}
        for v in variants.values():
            getattr(v.engine, "close", lambda: None)()
        dist.barrier()
    Path(spec["out"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


def launch(steps: int, warmup: int) -> list[dict]:
    return run_ranks(__file__, {"steps": steps, "warmup": warmup}, WORLD, quiet=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(ranks: list[dict]) -> list[dict]:
    rows, base = [], {}
    for mode, name, _ in VARIANTS:
        key = f"{mode}/{name}"
        per_rank = [r[key] for r in ranks]
        step = max(r["step_s"] for r in per_rank)
        base.setdefault(mode, step)
        rows.append(
            {
                "mode": mode,
                "backend": name,
                "step_ms": 1e3 * step,
                "x_torch": step / base[mode],
                "ranks": per_rank,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    p = rows[0]["ranks"][0]["shared_params"]
    print(
        f"\nengine.backend deepspeed vs torch: MLP encoder, P = {p / 1e6:.2f}M shared parameters, "
        f"T = {TASKS}, batch {BATCH}, Adam, 2 ranks (MiB per rank: rank 0 / rank 1)\n"
    )
    print(
        "| mode | backend | step ms | x torch | sent MiB/step | params MiB | opt state MiB "
        "| grads + buffers MiB | held MiB | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            " / ".join(mib(rank[k]) for rank in r["ranks"])
            for k in ("params", "opt_state", "grads_buffers", "held", "peak")
        ]
        sent = " / ".join(mib(rank["sent"]) for rank in r["ranks"])
        print(
            f"| {r['mode']} | {r['backend']} | {r['step_ms']:.1f} | {r['x_torch']:.2f} | {sent} | "
            + " | ".join(cells)
            + " |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        worker(ns.worker)
        return
    rows = table(launch(ns.steps, ns.warmup))
    print_table(rows)
    if ns.json:
        ns.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
