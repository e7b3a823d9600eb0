"""Step time and traffic of the task-parallel engine beside single-process training, as Markdown tables.

Two encoders, one thread per process, batch 64 of 3 x 32 x 32 inputs, T binary heads, SGD:
- `cnn`: a compute-bound 4-layer CNN (241k shared parameters), like the prototype the engine targets;
- `mlp`: a communication-heavy 3-layer MLP (2.9M shared parameters, little compute per parameter).
For T in {2, 4, 8} it times, side by side: single-process uniform scaling (one backward of the mean
loss), single-process exact MGDA (T backward passes) and MGDA-UB (`rep`), then 2 ranks of the engine
(layout 1 x 2) with exact MGDA over each protocol (gather, gramian, sketch) and `rep` (2 x 1).

Times are medians over the measured steps. "ideal" is what a 2-rank exact step cannot avoid: its own
data + forward + T/K backward passes + optimizer phases (the slower rank); "overhead" is the share of
the step spent in exchange, solve and apply. Bytes: "analytic" is `traffic.step_bytes`, the closed form
in the README; "accounted" is what the collective wrapper recorded; "measured" is the delta of
/proc/self/io `wchar` around the step, i.e. what the rank really wrote to its sockets (gloo sends with
writev; its reads use recv, which rchar does not count, so a rank's received bytes are measured as the
other rank's written bytes: with 2 ranks all of a rank's traffic is with the other one).
Finally the analytic bytes per step per rank of each protocol for the CIFAR-style ResNet-18 (P = 11.2M)
with 40 tasks at K = 8 and K = 40.

Run: python3 bench/step.py   (about 4 minutes on 2 CPU cores; --quick for a smoke run)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_mtl.build import build_balancer_for, build_optimizer  # noqa: E402
from dist_mtl.config import RunConfig, load_config  # noqa: E402
from dist_mtl.data.memory import part_rows  # noqa: E402
from dist_mtl.engine.launch import device_mesh, process_group  # noqa: E402
from dist_mtl.engine.layout import resolve_layout  # noqa: E402
from dist_mtl.engine.runtime import Engine  # noqa: E402
from dist_mtl.engine.traffic import StepShape, step_bytes  # noqa: E402
from dist_mtl.gradients import task_losses  # noqa: E402
from dist_mtl.models import MLPEncoder, MultiTaskModel, ResNet18Encoder  # noqa: E402
from dist_mtl.observe import PHASES, StepRecorder  # noqa: E402
from dist_mtl.reference import ExactStep, RepStep  # noqa: E402

CPU = torch.device("cpu")
BATCH, INPUT = 64, (3, 32, 32)
TASKS = (2, 4, 8)
PROTOCOLS = ("gather", "gramian", "sketch")
WORLD = 2


class CNNEncoder(nn.Module):
    """Four 3x3 convolutions (32, 64, 128, 128 channels, the last three with stride 2), global pooling."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((3, 32, 64, 128), (32, 64, 128, 128), strict=True)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(name: str, tasks: int) -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = CNNEncoder() if name == "cnn" else MLPEncoder(INPUT, [768, 512], 256)
    return MultiTaskModel(encoder, [nn.Linear(encoder.out_dim, 2) for _ in range(tasks)])


def make_batch(tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *INPUT, generator=gen), torch.randint(0, 2, (BATCH, tasks), generator=gen)


def config(protocol: str, tasks: int) -> RunConfig:
    rep = protocol == "rep"
    return load_config(
        None,
        [
            "balancer.name=mgda",
            "optim.name=sgd",
            "optim.lr=0.001",
            "engine.checksum_every=0",
            f"train.mode={'rep' if rep else 'exact'}",
            f"engine.protocol={'rep' if rep else protocol}",
            f"engine.task_parallel={1 if rep else WORLD}",
            f"data.num_tasks={tasks}",
            f"data.batch_size={BATCH}",
        ],
    )


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


class UniformStep:
    """Uniform scaling the cheap way: one backward of the mean loss, the baseline of every ratio."""

    def __init__(self, model: MultiTaskModel, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rec: StepRecorder) -> None:
        with rec.phase("forward"):
            losses = task_losses(self.model(x), y)
        with rec.phase("backward"):
            self.optimizer.zero_grad(set_to_none=False)
            losses.mean().backward()
        with rec.phase("optimizer"):
            self.optimizer.step()


def measure(
    step: Any, tasks: int, steps: int, warmup: int, part: tuple[int, int] = (0, 1)
) -> dict[str, list[float]]:
    """Per measured step: the phase times, the accounted bytes and the bytes written to sockets.

    `part`: the rank's part of the global batch (`Engine.data_part`), which is what a step takes.
    """
    x, y = make_batch(tasks)
    rows = part_rows(x.shape[0], part)
    x, y = x[rows], y[rows]
    rec = StepRecorder()
    keys = [f"time/{p}" for p in PHASES] + ["time/step", "bytes_sent/total", "bytes_recv/total", "written"]
    out: dict[str, list[float]] = {key: [] for key in keys}
    for i in range(warmup + steps):
        before = written_bytes()
        step(x, y, rec)
        written = written_bytes() - before
        record = {**rec.end_step(i + 1), "written": float(written)}
        if i >= warmup:
            for key in keys:
                out[key].append(record.get(key, 0.0))
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def single_process(model_name: str, tasks: int, kind: str, steps: int, warmup: int) -> dict[str, list[float]]:
    model = build_model(model_name, tasks)
    cfg = config("rep" if kind == "rep" else "gramian", tasks)
    optimizer = build_optimizer(cfg, list(model.parameters()))
    if kind == "uniform":
        return measure(UniformStep(model, optimizer), tasks, steps, warmup)
    step_type = RepStep if kind == "rep" else ExactStep
    return measure(step_type(model, build_balancer_for(cfg), optimizer), tasks, steps, warmup)


def worker(spec_path: str) -> None:
    """One of the 2 ranks: every (model, T, protocol) in sequence, results to out/rank{R}.json."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    task_layout = resolve_layout(config("gramian", 2), WORLD, 2)
    with process_group(task_layout, CPU, 120.0) as mesh:
        meshes = {
            (1, WORLD): mesh,
            (WORLD, 1): device_mesh(resolve_layout(config("rep", 2), WORLD, 2), CPU, 120.0),
        }
        for model_name, tasks, protocol in spec["runs"]:
            cfg = config(protocol, tasks)
            layout = resolve_layout(cfg, WORLD, tasks)
            engine = Engine(cfg, layout, meshes[(layout.replicas, layout.task_parallel)], CPU)
            model = build_model(model_name, tasks)
            optimizer = build_optimizer(cfg, list(model.parameters()))
            step = engine.make_step(cfg, model, build_balancer_for(cfg), optimizer)
            dist.barrier()
            steps, warmup = spec["steps"][model_name]
            key = f"{model_name}/{tasks}/{protocol}"
            results[key] = measure(step, tasks, steps, warmup, engine.data_part)
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))


def launch_workers(runs: list[tuple[str, int, str]], steps: dict[str, tuple[int, int]]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        spec = Path(out, "spec.json")
        spec.write_text(json.dumps({"runs": runs, "steps": steps, "out": out}))
        env = {
            **os.environ,
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
        }
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(spec)],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r in range(WORLD)
        ]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a benchmark rank failed")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape_of(model: MultiTaskModel, protocol: str, tasks: int, world: int) -> StepShape:
    """The traffic inputs of a D = 1 layout with K = world (exact protocols) or of `rep` on `world` ranks."""
    head = sum(p.numel() for p in model.head_parameters(0))
    rep = protocol == "rep"
    split = (tasks,) if rep else tuple(tasks // world + (1 if i < tasks % world else 0) for i in range(world))
    return StepShape(
        params=sum(p.numel() for p in model.shared_parameters()),
        split=split,
        replicas=world if rep else 1,
        head_params=tuple(head * n for n in split),
        all_head_params=head * tasks,
        sketch_size=4096,
    )


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def print_tables(single: dict[str, dict], ranks: list[dict], model_name: str) -> None:
    params = sum(p.numel() for p in build_model(model_name, 2).shared_parameters())
    print(f"\n### {model_name}: P = {params:,} shared parameters, batch {BATCH}, 1 thread per process\n")
    cols = ["1p uniform", "1p exact", "1p rep", *(f"2r {p}" for p in PROTOCOLS), "2r rep"]
    print(
        "| T | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | 2r gramian / 1p exact | 2r gramian / 1p uniform |"
    )
    print("|---" * (len(cols) + 3) + "|")
    for t in TASKS:
        times = [median(single[f"{model_name}/{t}/{k}"]["time/step"]) for k in ("uniform", "exact", "rep")]
        times += [median(ranks[0][f"{model_name}/{t}/{p}"]["time/step"]) for p in (*PROTOCOLS, "rep")]
        gramian = times[4]
        cells = " | ".join(f"{1e3 * v:.1f}" for v in times)
        print(f"| {t} | {cells} | {gramian / times[1]:.2f} | {gramian / times[0]:.2f} |")
    print("\n2-rank exact MGDA against its ideal, step by step: ideal = the slower rank's data + forward +")
    print(
        "T/K backward + optimizer; overhead = (step - ideal) / step; phase share = exchange + solve + apply"
    )
    print("on that rank. Medians over the measured steps.\n")
    print("| T | protocol | step ms | ideal ms | step / ideal | overhead | phase share |")
    print("|---|---|---|---|---|---|---|")
    compute = ("data", "forward", "backward", "optimizer")
    for t in TASKS:
        for p in PROTOCOLS:
            runs = [r[f"{model_name}/{t}/{p}"] for r in ranks]
            rows = []
            for i in range(len(runs[0]["time/step"])):
                ideals = [sum(r[f"time/{ph}"][i] for ph in compute) for r in runs]
                slow = runs[ideals.index(max(ideals))]
                step = slow["time/step"][i]
                share = sum(slow[f"time/{ph}"][i] for ph in ("exchange", "solve", "apply")) / step
                rows.append((step, max(ideals), step / max(ideals), 1 - max(ideals) / step, share))
            step, ideal, ratio, overhead, share = (median([row[j] for row in rows]) for j in range(5))
            print(
                f"| {t} | {p} | {1e3 * step:.1f} | {1e3 * ideal:.1f} | {ratio:.3f} "
                f"| {100 * overhead:.1f}% | {100 * share:.1f}% |"
            )
    print(
        "\nBytes per step per rank (MiB): measured (socket writes), accounted (wrapper), analytic (formula)\n"
    )
    print(
        "| T | protocol | rank | sent measured | sent accounted | sent analytic | recv measured "
        "| recv analytic | measured / analytic |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for t in TASKS:
        for p in (*PROTOCOLS, "rep"):
            runs = [r[f"{model_name}/{t}/{p}"] for r in ranks]
            shape = shape_of(build_model(model_name, t), p, t, WORLD)
            for rank in range(WORLD):
                sent, recv = step_bytes(p, shape, rank)
                m_sent, m_recv = median(runs[rank]["written"]), median(runs[1 - rank]["written"])
                ratio = (m_sent + m_recv) / (sent + recv)
                accounted = median(runs[rank]["bytes_sent/total"])
                print(
                    f"| {t} | {p} | {rank} | {mib(m_sent)} | {mib(accounted)} | {mib(sent)} "
                    f"| {mib(m_recv)} | {mib(recv)} | {ratio:.3f} |"
                )


def print_resnet_table() -> None:
    encoder = ResNet18Encoder((3, 64, 64), width=64)
    model = MultiTaskModel(encoder, [nn.Linear(encoder.out_dim, 2) for _ in range(40)])
    params = sum(p.numel() for p in model.shared_parameters())
    print(f"\n### Analytic bytes per step per rank: CIFAR-style ResNet-18 (P = {params:,}), T = 40, D = 1\n")
    print("Largest over ranks (the coordinator for gather); `rep` runs pure data parallelism on W = K ranks;")
    print("DDP = the all-reduce of one gradient, for scale. MiB sent / received.\n")
    print("| protocol | K = 8 sent | K = 8 recv | K = 40 sent | K = 40 recv |")
    print("|---|---|---|---|---|")
    rows = [
        ("gather (none)", "gather", "none"),
        ("gather (fp16)", "gather", "fp16"),
        ("gather (topk 1%)", "gather", "topk"),
        ("gramian", "gramian", "none"),
        ("sketch (m = 4096)", "sketch", "none"),
        ("rep", "rep", "none"),
    ]
    for label, protocol, compression in rows:
        cells = []
        for k in (8, 40):
            base = shape_of(model, protocol, 40, k)
            shape = StepShape(
                base.params,
                base.split,
                base.replicas,
                base.head_params,
                base.all_head_params,
                compression,
                0.01,
                4096,
            )
            moved = [step_bytes(protocol, shape, r) for r in range(k)]
            cells += [mib(max(s for s, _ in moved)), mib(max(r for _, r in moved))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    ddp = [mib(2 * (k - 1) / k * params * 4) for k in (8, 40)]
    print(f"| DDP all-reduce | {ddp[0]} | {ddp[0]} | {ddp[1]} | {ddp[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 measured steps each (a smoke run)")
    ns = parser.parse_args()
    if ns.worker:
        worker(ns.worker)
        return
    torch.set_num_threads(1)
    steps = {"cnn": (2, 1), "mlp": (2, 1)} if ns.quick else {"cnn": (8, 2), "mlp": (15, 3)}
    started = time.perf_counter()
    single = {
        f"{m}/{t}/{k}": single_process(m, t, k, *steps[m])
        for m in ("cnn", "mlp")
        for t in TASKS
        for k in ("uniform", "exact", "rep")
    }
    runs = [(m, t, p) for m in ("cnn", "mlp") for t in TASKS for p in (*PROTOCOLS, "rep")]
    ranks = launch_workers(runs, steps)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# bench/step.py: torch {torch.__version__}, gloo over loopback, {os.cpu_count()} CPU cores")
    print(f"(load average {load} at the end: other processes on the machine inflate absolute times)")
    for m in ("cnn", "mlp"):
        print_tables(single, ranks, m)
    print_resnet_table()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
