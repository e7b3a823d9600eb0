"""`rep` on 2 ranks (layout 2 x 1, exact MGDA-UB) with the shared-gradient all-reduce bucketed under the
encoder backward (engine.overlap, engine.bucket_mb) against one all-reduce after it (overlap off).

Both ranks run every setting in turn, `--rounds` times interleaved and rotated (so drift, other load
and the position in a round hit every setting alike), each time `--warmup` + `--steps` steps on the
bench/step.py models and batch (64 x 3 x 32 x 32, T binary heads, SGD). Prints per setting the median
step time over every measured step of the slower rank, the median seconds blocked waiting for
collectives ("comm wait"), the bytes per step the wrapper accounted, and each setting's step time
over the overlap-off one.

Run: python3 bench/rep_overlap.py [--model mlp|cnn] [--tasks T] [--bucket-mb MB ...] [--steps N]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_mtl.build import build_balancer_for, build_optimizer  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.memory import part_rows  # noqa: E402
from dist_mtl.engine.launch import process_group  # noqa: E402
from dist_mtl.engine.layout import resolve_layout  # noqa: E402
from dist_mtl.engine.runtime import Engine  # noqa: E402
from dist_mtl.observe import StepRecorder  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
assert _spec is not None and _spec.loader is not None
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)  # the models and batch of bench/step.py

WORLD = 2
CPU = torch.device("cpu")


def overrides(tasks: int, bucket_mb: float | None) -> list[str]:
    """rep with MGDA-UB; `bucket_mb` None: overlap off."""
    engine = ["engine.overlap=false"] if bucket_mb is None else [f"engine.bucket_mb={bucket_mb}"]
    return [
        "balancer.name=mgda",
        "optim.name=sgd",
        "optim.lr=0.001",
        "engine.checksum_every=0",
        "train.mode=rep",
        "engine.protocol=rep",
        "engine.task_parallel=1",
        f"data.num_tasks={tasks}",
        f"data.batch_size={step_bench.BATCH}",
        *engine,
    ]


def label(bucket_mb: float | None) -> str:
    return "overlap off" if bucket_mb is None else f"overlap, {bucket_mb:g} MiB buckets"


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    settings = [None if b < 0 else b for b in spec["buckets"]]
    results: dict[str, dict[str, list[float]]] = {label(b): {} for b in settings}
    first = load_config(None, overrides(spec["tasks"], None))
    layout = resolve_layout(first, WORLD, spec["tasks"])
    with process_group(layout, CPU, 120.0) as mesh:
        for r in range(spec["rounds"]):
            for bucket_mb in settings[r % len(settings) :] + settings[: r % len(settings)]:
                cfg = load_config(None, overrides(spec["tasks"], bucket_mb))
                engine = Engine(cfg, layout, mesh, CPU)
                model = step_bench.build_model(spec["model"], spec["tasks"])
                optimizer = build_optimizer(cfg, list(model.parameters()))
                step = engine.make_step(cfg, model, build_balancer_for(cfg), optimizer)
                dist.barrier()
                x, y = step_bench.make_batch(spec["tasks"])
                rows = part_rows(x.shape[0], engine.data_part)
                x, y = x[rows], y[rows]
                rec = StepRecorder()
                for i in range(spec["warmup"] + spec["steps"]):
                    step(x, y, rec)
                    record = rec.end_step(i + 1)
                    if i >= spec["warmup"]:
                        for key in ("time/step", "bytes_sent/total", "comm_seconds/total"):
                            results[label(bucket_mb)].setdefault(key, []).append(record[key])
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1.0, 25.0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    spec = {
        "model": ns.model,
        "tasks": ns.tasks,
        "buckets": [-1.0, *ns.bucket_mb],
        "steps": ns.steps,
        "warmup": ns.warmup,
        "rounds": ns.rounds,
    }
    ranks = step_bench.run_ranks(__file__, spec, WORLD)
    params = step_bench.shared_params(ns.model)
    print(f"rep, 2 ranks, {ns.model} (P = {params:,}), T = {ns.tasks}, {ns.rounds} x {ns.steps} steps")
    print("| setting | step ms (median, slower rank) | comm wait ms | MiB sent per step | vs off |")
    print("|---|---|---|---|---|")
    base = None
    for name in ranks[0]:
        steps = [max(a, b) for a, b in zip(*(r[name]["time/step"] for r in ranks), strict=True)]
        step_ms = 1e3 * statistics.median(steps)
        wait_ms = 1e3 * statistics.median(ranks[0][name]["comm_seconds/total"])
        sent = statistics.median(ranks[0][name]["bytes_sent/total"]) / 2**20
        base = step_ms if base is None else base
        print(f"| {name} | {step_ms:.1f} | {wait_ms:.1f} | {sent:.2f} | {step_ms / base:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
