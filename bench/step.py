"""Step time and traffic of the task-parallel engine beside single-process training, as Markdown tables.

Two encoders, one thread per process, batch 64 of 3 x 32 x 32 inputs, T binary heads, SGD (momentum 0.9):
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

The K = T row: exact MGDA on 2 ranks at T = 2 (layout 1 x 2, `gramian`, so each rank runs ONE backward
pass, as uniform scaling does) against the single-process uniform step on the same model, measured with
more steps than the main table, the single-process run right before the 2-rank one. Its ratio is what
exact balancing costs once the T backward passes are spread over K = T ranks (the issue's target on the
CNN: <= 1.15).

Optimizer-state bytes per rank: the sum of numel x element size of every tensor in each rank's
`optimizer.state` after the measured steps, for every single-process run and every engine run.

Finally the analytic bytes per step per rank of each protocol for the CIFAR-style ResNet-18 (P = 11.2M)
with 40 tasks at K = 8 and K = 40.

`--json FILE` also writes every measured row (config, phase medians, ideal, ratios, bytes analytic /
accounted / measured, optimizer-state bytes) with the commit, so runs can be compared across commits.
`--single-process-only` times only the single-process steps (uniform, exact MGDA, rep), on `--device`
(cpu, or cuda: then the step is timed by torch.cuda.synchronize around the whole step, and the phases,
which would be host launch times, are not reported); bench/gpu_check.sh runs it on a GPU.

Run: python3 bench/step.py [--quick] [--json FILE]   (about 70 s on 2 CPU cores; --quick, a smoke
run under a minute)
     python3 bench/step.py --single-process-only --device cuda --tasks 4 8 [--steps N --warmup N]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
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
MODELS = ("cnn", "mlp")
TASKS = (2, 4, 8)
KINDS = ("uniform", "exact", "rep")  # the single-process steps
PROTOCOLS = ("gather", "gramian", "sketch")
# Engine options measured beside the defaults (overlap on, sharded optimizer on), in the same run:
# "<protocol>:<variant>" runs the protocol with these overrides.
VARIANTS = {
    "serial": ["engine.overlap=false"],  # the exchange after the last backward, in one piece
    "bf16": ["engine.wire_dtype=bfloat16"],  # gramian's bfloat16 all-to-all
    "unsharded": ["engine.shard_optimizer=false"],  # the full optimizer on every rank
}
VARIANT_RUNS = ("gather:serial", "gramian:serial", "gramian:bf16", "gramian:unsharded")
DIST_TARGET = 1.15  # the bound on 2r gramian at T = 8 over 1p exact at T = 4 (MLP)
WORLD = 2
KT_TASKS = 2  # the K = T row: T = K = WORLD, one task (one backward pass) per rank
KT_TARGET = {"cnn": 1.15}  # the target for exact-on-K=T / single-process uniform
# (measured steps, warm-up steps) per section and model
STEPS = {"main": {"cnn": (8, 2), "mlp": (15, 3)}, "k_equals_t": {"cnn": (24, 3), "mlp": (40, 5)}}
QUICK_STEPS = {"main": {"cnn": (2, 1), "mlp": (2, 1)}, "k_equals_t": {"cnn": (2, 1), "mlp": (2, 1)}}
COMPUTE = ("data", "forward", "backward", "optimizer")  # what an exact 2-rank step cannot avoid
EXCHANGE = ("exchange", "solve", "apply")
# Exposed exchange: the time a rank is blocked on (or forming) the exchange and d, outside the solve.
# Launching an overlapped round costs microseconds inside the backward; every wait is in "exchange".
EXPOSED = ("exchange", "apply")
JSON_SCHEMA = "dist_mtl-bench-step/1"


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


_PARAMS: dict[str, int] = {}


def shared_params(name: str) -> int:
    if name not in _PARAMS:
        _PARAMS[name] = sum(p.numel() for p in build_model(name, 2).shared_parameters())
    return _PARAMS[name]


def make_batch(tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *INPUT, generator=gen), torch.randint(0, 2, (BATCH, tasks), generator=gen)


def config(run: str, tasks: int) -> RunConfig:
    """The config of a run: a protocol name, optionally ":variant" (VARIANTS)."""
    protocol, _, variant = run.partition(":")
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
            *(VARIANTS[variant] if variant else []),
        ],
    )


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """numel x element size of every tensor in the optimizer's state (momentum buffers, Adam moments...)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


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
    step: Any,
    optimizer: torch.optim.Optimizer,
    tasks: int,
    steps: int,
    warmup: int,
    part: tuple[int, int] = (0, 1),
    device: torch.device = CPU,
) -> dict[str, list[float]]:
    """Per measured step: the phase times, the accounted bytes, the bytes written to sockets and the
    optimizer-state bytes after the step.

    `part`: the rank's part of the global batch (`Engine.data_part`), which is what a step takes. On
    CUDA the step time is the wall time between two `torch.cuda.synchronize` around the whole step
    (the recorder does not synchronise at phase boundaries, so its phase times are launch times).
    """
    x, y = make_batch(tasks)
    rows = part_rows(x.shape[0], part)
    x, y = x[rows].to(device), y[rows].to(device)
    cuda = device.type == "cuda"
    rec = StepRecorder()
    keys = [f"time/{p}" for p in PHASES] + ["time/step", "bytes_sent/total", "bytes_recv/total", "written"]
    out: dict[str, list[float]] = {key: [] for key in [*keys, "optimizer_state_bytes"]}
    for i in range(warmup + steps):
        before = written_bytes()
        if cuda:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
        step(x, y, rec)
        if cuda:
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
        written = written_bytes() - before
        record = {**rec.end_step(i + 1), "written": float(written)}
        if cuda:
            record["time/step"] = wall
        if i >= warmup:
            for key in keys:
                out[key].append(record.get(key, 0.0))
            out["optimizer_state_bytes"].append(float(optimizer_state_bytes(optimizer)))
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def single_process(
    model_name: str, tasks: int, kind: str, steps: int, warmup: int, device: torch.device = CPU
) -> dict[str, list[float]]:
    model = build_model(model_name, tasks).to(device)
    cfg = config("rep" if kind == "rep" else "gramian", tasks)
    optimizer = build_optimizer(cfg, list(model.parameters()))
    if kind == "uniform":
        step: Any = UniformStep(model, optimizer)
    else:
        step = (RepStep if kind == "rep" else ExactStep)(model, build_balancer_for(cfg), optimizer)
    return measure(step, optimizer, tasks, steps, warmup, device=device)


def worker(spec_path: str) -> None:
    """One of the 2 ranks: every (section, model, T, protocol) in sequence, results to out/rank{R}.json."""
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
        for section, model_name, tasks, protocol in spec["runs"]:
            cfg = config(protocol, tasks)
            layout = resolve_layout(cfg, WORLD, tasks)
            engine = Engine(cfg, layout, meshes[(layout.replicas, layout.task_parallel)], CPU)
            model = build_model(model_name, tasks)
            optimizer = build_optimizer(cfg, list(model.parameters()))
            step = engine.make_step(cfg, model, build_balancer_for(cfg), optimizer)
            dist.barrier()
            steps, warmup = spec["steps"][section][model_name]
            key = f"{section}/{model_name}/{tasks}/{protocol}"
            results[key] = measure(step, optimizer, tasks, steps, warmup, engine.data_part)
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))


def launch_workers(runs: list[tuple[str, str, int, str]], steps: dict[str, dict]) -> list[dict]:
    return run_ranks(__file__, {"runs": runs, "steps": steps})


def run_ranks(script: str, spec: dict[str, Any], world: int = WORLD, quiet: bool = False) -> list[dict]:
    """Run `script --worker SPEC` as `world` local ranks (env:// rendezvous on a free port); each rank
    writes SPEC's out/rank{R}.json, returned in rank order. `quiet`: ranks other than 0 print nothing.
    The bench scripts' one launcher."""
    with tempfile.TemporaryDirectory() as out:
        path = Path(out, "spec.json")
        path.write_text(json.dumps({**spec, "out": out}))
        env = {
            **os.environ,
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
        }
        procs = [
            subprocess.Popen(
                [sys.executable, script, "--worker", str(path)],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.DEVNULL if quiet and r else None,
            )
            for r in range(world)
        ]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a benchmark rank failed")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape_of(
    model: MultiTaskModel, protocol: str, tasks: int, world: int, cfg: RunConfig | None = None
) -> StepShape:
    """The traffic inputs of a D = 1 layout with K = world (exact protocols) or of `rep` on `world` ranks,
    with `cfg`'s engine options (overlap, wire, sharding, buckets) when given."""
    head = sum(p.numel() for p in model.head_parameters(0))
    rep = protocol == "rep"
    split = (tasks,) if rep else tuple(tasks // world + (1 if i < tasks % world else 0) for i in range(world))
    return StepShape(
        params=sum(p.numel() for p in model.shared_parameters()),
        split=split,
        replicas=world if rep else 1,
        head_params=tuple(head * n for n in split),
        all_head_params=head * tasks,
        shared_sizes=tuple(p.numel() for p in model.shared_parameters()),
        **(StepShape.engine_options(cfg.engine) if cfg is not None else {"sketch_size": 4096}),
    )


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


# --- rows: every measured run as one dict (what --json writes and every table prints) -----------------


def versus_ideal(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """A 2-rank exact step against its ideal, step by step, then medians: the slower rank's step (the
    rank with the larger data + forward + backward + optimizer), that ideal, their ratio, the overhead
    (step - ideal) / step and the exchange + solve + apply share of that rank's step. Seconds."""
    rows = []
    for i in range(len(runs[0]["time/step"])):
        ideals = [sum(r[f"time/{ph}"][i] for ph in COMPUTE) for r in runs]
        slow = runs[ideals.index(max(ideals))]
        step = slow["time/step"][i]
        share = sum(slow[f"time/{ph}"][i] for ph in EXCHANGE) / step
        exposed = max(sum(r[f"time/{ph}"][i] for ph in EXPOSED) for r in runs)
        rows.append((step, max(ideals), step / max(ideals), 1 - max(ideals) / step, share, exposed))
    keys = ("step", "ideal", "step_over_ideal", "overhead", "phase_share", "exposed")
    return {key: median([row[j] for row in rows]) for j, key in enumerate(keys)}


def phase_ms(series: dict[str, list[float]]) -> dict[str, float]:
    return {p: 1e3 * median(series[f"time/{p}"]) for p in PHASES}


def single_row(section: str, model_name: str, tasks: int, kind: str, series: dict, device: str) -> dict:
    """One single-process run (`kind` uniform, exact or rep)."""
    return {
        "section": section,
        "run": f"1p {kind}",
        "model": model_name,
        "params": shared_params(model_name),
        "tasks": tasks,
        "batch": BATCH,
        "device": device,
        "processes": 1,
        "layout": None,
        "mode": {"uniform": "uniform (one backward of the mean loss)", "exact": "exact", "rep": "rep"}[kind],
        "protocol": None,
        "balancer": None if kind == "uniform" else "mgda",
        "optimizer": "sgd (momentum 0.9)",
        "steps": len(series["time/step"]),
        "step_ms": 1e3 * median(series["time/step"]),
        # on CUDA the recorder does not synchronise: its phase times would be launch times
        "phase_ms": phase_ms(series) if device == "cpu" else None,
        "optimizer_state_bytes": int(median(series["optimizer_state_bytes"])),
    }


def engine_row(section: str, model_name: str, tasks: int, protocol: str, runs: list[dict]) -> dict:
    """One 2-rank engine run: per rank its phases, bytes and optimizer state; for exact protocols the
    comparison with the ideal step. `step_ms` is rank 0's median step (both ranks wait for each other)."""
    rep = protocol == "rep"
    cfg = config(protocol, tasks)
    shape = shape_of(build_model(model_name, tasks), cfg.engine.protocol, tasks, WORLD, cfg)
    ranks = []
    for rank in range(WORLD):
        sent, recv = step_bytes(cfg.engine.protocol, shape, rank)
        m_sent, m_recv = median(runs[rank]["written"]), median(runs[1 - rank]["written"])
        ranks.append(
            {
                "rank": rank,
                "step_ms": 1e3 * median(runs[rank]["time/step"]),
                "phase_ms": phase_ms(runs[rank]),
                "optimizer_state_bytes": int(median(runs[rank]["optimizer_state_bytes"])),
                "bytes": {
                    "sent_measured": m_sent,
                    "sent_accounted": median(runs[rank]["bytes_sent/total"]),
                    "sent_analytic": sent,
                    "recv_measured": m_recv,
                    "recv_accounted": median(runs[rank]["bytes_recv/total"]),
                    "recv_analytic": recv,
                    "measured_over_analytic": (m_sent + m_recv) / (sent + recv) if sent + recv else None,
                },
            }
        )
    row: dict[str, Any] = {
        "section": section,
        "run": f"2r {protocol}",
        "model": model_name,
        "params": shared_params(model_name),
        "tasks": tasks,
        "batch": BATCH,
        "device": "cpu",
        "processes": WORLD,
        "layout": f"{WORLD}x1" if rep else f"1x{WORLD}",
        "mode": "rep" if rep else "exact",
        "protocol": protocol,
        "balancer": "mgda",
        "optimizer": "sgd (momentum 0.9)",
        "steps": len(runs[0]["time/step"]),
        "step_ms": ranks[0]["step_ms"],
        "ranks": ranks,
    }
    if not rep:
        ideal = versus_ideal(runs)
        row.update(
            slower_rank_step_ms=1e3 * ideal["step"],
            ideal_ms=1e3 * ideal["ideal"],
            step_over_ideal=ideal["step_over_ideal"],
            overhead=ideal["overhead"],
            exchange_solve_apply_share=ideal["phase_share"],
            exposed_exchange_ms=1e3 * ideal["exposed"],
        )
    return row


def build_rows(
    single: dict[str, dict],
    ranks: list[dict] | None,
    models: Sequence[str],
    tasks: Sequence[int],
    device: str,
) -> list[dict]:
    """Every measured run as a row, with its ratios to the single-process runs of the same model and T.

    `single` is keyed `section/model/T/kind`, each rank's results `section/model/T/protocol`; `ranks` is
    None for a single-process-only run (then there is no engine row and no K = T section).
    """
    rows = []
    for key, series in single.items():
        section, model_name, t, kind = key.split("/")
        rows.append(single_row(section, model_name, int(t), kind, series, device))
    if ranks is not None:
        for key in ranks[0]:
            section, model_name, t, protocol = key.split("/")
            rows.append(engine_row(section, model_name, int(t), protocol, [r[key] for r in ranks]))
    index = {(r["section"], r["model"], r["tasks"], r["run"]): r for r in rows}
    for row in rows:
        ratios = {}
        for kind in ("uniform", "exact"):
            base = index.get((row["section"], row["model"], row["tasks"], f"1p {kind}"))
            if base is not None and base is not row:
                ratios[f"over_1p_{kind}"] = row["step_ms"] / base["step_ms"]
        row["ratios"] = ratios
        if row["section"] == "k_equals_t" and row["processes"] > 1:
            base = index[(row["section"], row["model"], row["tasks"], "1p uniform")]
            # the slower rank's step, step by step, over the single-process uniform step
            row["ratios"]["k_equals_t_over_1p_uniform"] = row["slower_rank_step_ms"] / base["step_ms"]
            # = (ideal / 1p uniform) x (step / ideal): the rank's own compute against one process alone
            # (2 processes share the machine), times what the exchange adds
            row["ratios"]["ideal_over_1p_uniform"] = row["ideal_ms"] / base["step_ms"]
            row["target"] = KT_TARGET.get(row["model"])
    order = {m: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: (r["section"] != "main", order.get(r["model"], 99), r["tasks"]))
    return rows


def find(rows: list[dict], section: str, model_name: str, tasks: int, run: str) -> dict:
    return next(
        r
        for r in rows
        if (r["section"], r["model"], r["tasks"], r["run"]) == (section, model_name, tasks, run)
    )


# --- tables --------------------------------------------------------------------------------------------


def print_tables(rows: list[dict], model_name: str, tasks: Sequence[int]) -> None:
    params = shared_params(model_name)
    print(f"\n### {model_name}: P = {params:,} shared parameters, batch {BATCH}, 1 thread per process\n")
    cols = [*(f"1p {k}" for k in KINDS), *(f"2r {p}" for p in PROTOCOLS), "2r rep"]
    print(
        "| T | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | 2r gramian / 1p exact | 2r gramian / 1p uniform |"
    )
    print("|---" * (len(cols) + 3) + "|")
    for t in tasks:
        times = [find(rows, "main", model_name, t, c)["step_ms"] for c in cols]
        gramian = find(rows, "main", model_name, t, "2r gramian")
        cells = " | ".join(f"{v:.1f}" for v in times)
        ratios = gramian["ratios"]
        print(f"| {t} | {cells} | {ratios['over_1p_exact']:.2f} | {ratios['over_1p_uniform']:.2f} |")
    print("\n2-rank exact MGDA against its ideal, step by step: ideal = the slower rank's data + forward +")
    print(
        "T/K backward + optimizer; overhead = (step - ideal) / step; phase share = exchange + solve + apply"
    )
    print("on that rank. Medians over the measured steps.\n")
    print("| T | protocol | step ms | ideal ms | step / ideal | overhead | phase share |")
    print("|---|---|---|---|---|---|---|")
    for t in tasks:
        for p in PROTOCOLS:
            r = find(rows, "main", model_name, t, f"2r {p}")
            print(
                f"| {t} | {p} | {r['slower_rank_step_ms']:.1f} | {r['ideal_ms']:.1f} "
                f"| {r['step_over_ideal']:.3f} | {100 * r['overhead']:.1f}% "
                f"| {100 * r['exchange_solve_apply_share']:.1f}% |"
            )
    print(
        "\nBytes per step per rank (MiB): measured (socket writes), accounted (wrapper), analytic (formula)\n"
    )
    print(
        "| T | protocol | rank | sent measured | sent accounted | sent analytic | recv measured "
        "| recv analytic | measured / analytic |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for t in tasks:
        for p in (*PROTOCOLS, "rep"):
            for rank in find(rows, "main", model_name, t, f"2r {p}")["ranks"]:
                b = rank["bytes"]
                print(
                    f"| {t} | {p} | {rank['rank']} | {mib(b['sent_measured'])} | {mib(b['sent_accounted'])} "
                    f"| {mib(b['sent_analytic'])} | {mib(b['recv_measured'])} | {mib(b['recv_analytic'])} "
                    f"| {b['measured_over_analytic']:.3f} |"
                )
    print("\nOptimizer-state bytes per rank (MiB; every tensor in optimizer.state after the measured steps;")
    print("2r cells: rank 0 / rank 1)\n")
    print("| T | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for t in tasks:
        cells = []
        for c in cols:
            r = find(rows, "main", model_name, t, c)
            if r["processes"] == 1:
                cells.append(mib(r["optimizer_state_bytes"]))
            else:
                cells.append(" / ".join(mib(rank["optimizer_state_bytes"]) for rank in r["ranks"]))
        print(f"| {t} | " + " | ".join(cells) + " |")


def print_overlap(rows: list[dict], model_name: str, tasks: Sequence[int]) -> None:
    """Overlap on (default) against off, and the gramian variants, side by side in the same run."""
    print(f"\n### {model_name}: overlap and the engine options, 2 ranks (1 x 2), exact MGDA\n")
    print("exposed = the slower rank's exchange + apply time (blocked on collectives or forming d; the")
    print("solve excluded), medians over the measured steps; serial = engine.overlap=false.\n")
    print(
        "| T | protocol | step ms (overlap / serial) | step / ideal (overlap / serial) "
        "| exposed ms (overlap / serial) | exposed overlap / serial |"
    )
    print("|---|---|---|---|---|---|")
    for t in tasks:
        for p in ("gather", "gramian"):
            on, off = (
                find(rows, "main", model_name, t, f"2r {p}"),
                find(rows, "main", model_name, t, f"2r {p}:serial"),
            )
            ratio = (
                on["exposed_exchange_ms"] / off["exposed_exchange_ms"]
                if off["exposed_exchange_ms"]
                else float("nan")
            )
            print(
                f"| {t} | {p} | {on['slower_rank_step_ms']:.1f} / {off['slower_rank_step_ms']:.1f} "
                f"| {on['step_over_ideal']:.3f} / {off['step_over_ideal']:.3f} "
                f"| {on['exposed_exchange_ms']:.1f} / {off['exposed_exchange_ms']:.1f} | {ratio:.2f} |"
            )
    print("\ngramian variants (rank 0 / rank 1 where two numbers): bytes sent per step (accounted, MiB),")
    print("optimizer state per rank (MiB)\n")
    print("| T | run | step ms | step / ideal | exposed ms | sent MiB | optimizer state MiB |")
    print("|---|---|---|---|---|---|---|")
    for t in tasks:
        for run in ("gramian", "gramian:serial", "gramian:bf16", "gramian:unsharded"):
            r = find(rows, "main", model_name, t, f"2r {run}")
            sent = " / ".join(mib(rank["bytes"]["sent_accounted"]) for rank in r["ranks"])
            state = " / ".join(mib(rank["optimizer_state_bytes"]) for rank in r["ranks"])
            print(
                f"| {t} | {run} | {r['slower_rank_step_ms']:.1f} | {r['step_over_ideal']:.3f} "
                f"| {r['exposed_exchange_ms']:.1f} | {sent} | {state} |"
            )
    if 4 in tasks and 8 in tasks:
        two, one = (
            find(rows, "main", model_name, 8, "2r gramian"),
            find(rows, "main", model_name, 4, "1p exact"),
        )
        ratio = two["slower_rank_step_ms"] / one["step_ms"]
        print(
            f"\nDistribution overhead: 2r gramian at T = 8 {two['slower_rank_step_ms']:.1f} ms / 1p exact "
            f"at T = 4 (the same per-rank compute, no exchange) {one['step_ms']:.1f} ms = {ratio:.3f}"
            + (f" (target <= {DIST_TARGET})" if model_name == "mlp" else "")
        )


def print_k_equals_t(rows: list[dict], models: Sequence[str]) -> None:
    print(f"\n### K = T: exact MGDA on {WORLD} ranks at T = {KT_TASKS} (layout 1 x {WORLD}, gramian)\n")
    print("Each rank runs ONE backward pass, as the single-process uniform step (one backward of the mean")
    print("loss) on the same model does; 2r step = the slower rank's step; medians over the measured steps.")
    print("K=T / 1p uniform = (ideal / 1p uniform: the rank's own data + forward + backward + optimizer")
    print("against one process alone) x (step / ideal: what the exchange, solve and apply add).\n")
    print(
        "| model | T = K | steps | 1p uniform ms | 2r gramian ms | ideal ms | ideal / 1p uniform "
        "| step / ideal | K=T / 1p uniform | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        uniform = find(rows, "k_equals_t", m, KT_TASKS, "1p uniform")
        exact = find(rows, "k_equals_t", m, KT_TASKS, "2r gramian")
        ratio = exact["ratios"]["k_equals_t_over_1p_uniform"]
        target = exact["target"]
        verdict = "-" if target is None else f"<= {target} ({'met' if ratio <= target else 'missed'})"
        print(
            f"| {m} | {KT_TASKS} | {exact['steps']} | {uniform['step_ms']:.1f} "
            f"| {exact['slower_rank_step_ms']:.1f} | {exact['ideal_ms']:.1f} "
            f"| {exact['ratios']['ideal_over_1p_uniform']:.3f} | {exact['step_over_ideal']:.3f} "
            f"| {ratio:.3f} | {verdict} |"
        )


def print_single_only(rows: list[dict], models: Sequence[str], tasks: Sequence[int], device: str) -> None:
    print(f"\n### Single process on {device}: batch {BATCH}, SGD; ms per step, medians")
    print("(uniform: one backward of the mean loss; exact: MGDA, T backward passes; rep: MGDA-UB)\n")
    print(
        "| model | P | T | 1p uniform ms | 1p exact ms | 1p rep ms | exact / uniform | rep / uniform "
        "| optimizer state MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for t in tasks:
            r = {k: find(rows, "main", m, t, f"1p {k}") for k in KINDS}
            ms = " | ".join(f"{r[k]['step_ms']:.2f}" for k in KINDS)
            ratios = " | ".join(f"{r[k]['ratios']['over_1p_uniform']:.2f}" for k in ("exact", "rep"))
            state = mib(r["exact"]["optimizer_state_bytes"])
            print(f"| {m} | {shared_params(m):,} | {t} | {ms} | {ratios} | {state} |")


def resnet_rows() -> list[dict]:
    """Analytic bytes per step per rank for the CIFAR-style ResNet-18, T = 40, D = 1, K = 8 and 40."""
    encoder = ResNet18Encoder((3, 64, 64), width=64)
    model = MultiTaskModel(encoder, [nn.Linear(encoder.out_dim, 2) for _ in range(40)])
    params = sum(p.numel() for p in model.shared_parameters())
    rows = []
    for label, protocol, compression in (
        ("gather (none)", "gather", "none"),
        ("gather (fp16)", "gather", "fp16"),
        ("gather (topk 1%)", "gather", "topk"),
        ("gramian", "gramian", "none"),
        ("sketch (m = 4096)", "sketch", "none"),
        ("rep", "rep", "none"),
    ):
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
            sent, recv = max(s for s, _ in moved), max(r for _, r in moved)
            rows.append(
                {"protocol": label, "params": params, "tasks": 40, "K": k, "sent": sent, "recv": recv}
            )
    for k in (8, 40):
        ddp = 2 * (k - 1) / k * params * 4
        rows.append(
            {"protocol": "DDP all-reduce", "params": params, "tasks": 40, "K": k, "sent": ddp, "recv": ddp}
        )
    return rows


def print_resnet_table(rows: list[dict]) -> None:
    params = rows[0]["params"]
    print(f"\n### Analytic bytes per step per rank: CIFAR-style ResNet-18 (P = {params:,}), T = 40, D = 1\n")
    print("Largest over ranks (the coordinator for gather); `rep` runs pure data parallelism on W = K ranks;")
    print("DDP = the all-reduce of one gradient, for scale. MiB sent / received.\n")
    print("| protocol | K = 8 sent | K = 8 recv | K = 40 sent | K = 40 recv |")
    print("|---|---|---|---|---|")
    labels = list(dict.fromkeys(r["protocol"] for r in rows))
    for label in labels:
        cells = []
        for k in (8, 40):
            r = next(r for r in rows if r["protocol"] == label and r["K"] == k)
            cells += [mib(r["sent"]), mib(r["recv"])]
        print(f"| {label} | " + " | ".join(cells) + " |")


# --- main ----------------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 measured steps each (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write every measured row as JSON to FILE")
    parser.add_argument(
        "--single-process-only",
        action="store_true",
        help="only the single-process steps (uniform, exact MGDA, rep), no engine ranks",
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the single-process steps (cpu, cuda; default cpu)"
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=list(TASKS), metavar="T", help="task counts (default 2 4 8)"
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="encoders")
    parser.add_argument(
        "--steps", type=int, metavar="N", help="measured steps per run (overrides the defaults)"
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N", help="warm-up steps per run (overrides the defaults)"
    )
    ns = parser.parse_args(argv)
    if ns.worker:
        return ns
    try:
        device = torch.device(ns.device)
    except RuntimeError as exc:
        parser.error(f"--device {ns.device!r}: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda; got {ns.device!r}")
    if device.type != "cpu" and not ns.single_process_only:
        parser.error("--device cuda needs --single-process-only: the engine ranks run gloo on the CPU")
    min_tasks = 1 if ns.single_process_only else WORLD
    if any(t < min_tasks for t in ns.tasks):
        parser.error(f"--tasks: every T must be >= {min_tasks} (the engine runs {WORLD} task ranks)")
    if ns.steps is not None and ns.steps < 1:
        parser.error("--steps must be >= 1")
    if ns.warmup is not None and ns.warmup < 0:
        parser.error("--warmup must be >= 0")
    ns.tasks = list(dict.fromkeys(ns.tasks))
    return ns


def step_counts(ns: argparse.Namespace) -> dict[str, dict[str, tuple[int, int]]]:
    """(measured, warm-up) steps per section and model, with --quick, --steps and --warmup applied."""
    base = QUICK_STEPS if ns.quick else STEPS
    return {
        section: {
            m: (ns.steps if ns.steps is not None else n, ns.warmup if ns.warmup is not None else w)
            for m, (n, w) in per_model.items()
        }
        for section, per_model in base.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    ns = parse_args(argv)
    if ns.worker:
        worker(ns.worker)
        return
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench/step.py: error: --device {ns.device}: no CUDA device is available")
    torch.set_num_threads(1)
    steps = step_counts(ns)
    models, tasks = ns.models, ns.tasks
    started = time.perf_counter()
    single = {
        f"main/{m}/{t}/{k}": single_process(m, t, k, *steps["main"][m], device=device)
        for m in models
        for t in tasks
        for k in KINDS
    }
    ranks = None
    if not ns.single_process_only:
        # the K = T row: its single-process uniform step right before the ranks, which run it first
        for m in models:
            single[f"k_equals_t/{m}/{KT_TASKS}/uniform"] = single_process(
                m, KT_TASKS, "uniform", *steps["k_equals_t"][m]
            )
        runs = [("k_equals_t", m, KT_TASKS, "gramian") for m in models]
        runs += [("main", m, t, p) for m in models for t in tasks for p in (*PROTOCOLS, *VARIANT_RUNS, "rep")]
        ranks = launch_workers(runs, steps)
    rows = build_rows(single, ranks, models, tasks, device.type)
    load = os.getloadavg()
    where = "gloo over loopback" if ranks is not None else f"single process on {device}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    gpu = f", {name}" if name else ""
    print(f"# bench/step.py: torch {torch.__version__}, {where}, {os.cpu_count()} CPU cores{gpu}")
    print(f"(load average {', '.join(f'{v:.1f}' for v in load)} at the end: other processes on the machine")
    print("inflate absolute times)")
    resnet = []
    if ranks is None:
        print_single_only(rows, models, tasks, str(device))
    else:
        for m in models:
            print_tables(rows, m, tasks)
            print_overlap(rows, m, tasks)
        print_k_equals_t(rows, models)
        resnet = resnet_rows()
        print_resnet_table(resnet)
    seconds = time.perf_counter() - started
    print(f"\n(total {seconds:.0f} s)")
    if ns.json:
        report = {
            "schema": JSON_SCHEMA,
            "meta": {
                **git_state(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": list(sys.argv[1:] if argv is None else argv),
                "quick": ns.quick,
                "single_process_only": ns.single_process_only,
                "device": str(device),
                "device_name": name,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "cpu_count": os.cpu_count(),
                "load_average": list(load),
                "threads_per_process": 1,
                "world": None if ranks is None else WORLD,
                "batch": BATCH,
                "models": list(models),
                "tasks": list(tasks),
                "steps": {s: {m: list(v) for m, v in per.items()} for s, per in steps.items()},
                "seconds": seconds,
            },
            "rows": rows,
            "resnet18_analytic_bytes": resnet,
        }
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
