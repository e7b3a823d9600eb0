"""The streamed data path on generated CelebA-like shards: loader throughput, memory, first step, data share.

Shards are generated as `dist-mtl data celeba` writes them from 178 x 218 JPEG sources stored at
64 x 64 (`dist_mtl.data.celeba_like`). Measured, side by side in one run:

1. Loader throughput (samples/s) of `ShardSource.train_batches` with 0, 1 and 2 workers (batch 256,
   one data part), after the first batch, beside what one ResNet-18 CelebA step (the MGDA-UB recipe,
   batch 256, one process) consumes on this machine.
2. Peak resident memory of one rank (the training process; its loader workers separately) over a
   5-step run of the recipe at width 16 with data.workers=2, at 2,000 and 20,000 images; the time
   from the process start to the first batch in hand and to the end of step 1; and, for scale, the
   time a fresh interpreter takes to import the entry point (torch included).
3. The `data` phase's share of the step on a 2-rank run of the recipe (MGDA-UB, two data parts) on
   the 20,000-image set at width 16, from the run's metrics (what `dist-mtl profile` reports). Exact
   MGDA's step is far longer on a CPU (T/K = 20 encoder backward passes: 134 s at width 16 and
   batch 256), which only shrinks the share.

Run: python3 bench/data.py            (about 12 minutes on 2 CPU cores; --quick for a smoke run)
     python3 bench/data.py --json out.json   also writes the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data import DEFAULT_SHARD_SIZE  # noqa: E402
from dist_mtl.data.celeba_like import make_celeba_like_shards  # noqa: E402
from dist_mtl.data.stream import ShardSource  # noqa: E402
from dist_mtl.observe import StepRecorder  # noqa: E402

CPU = torch.device("cpu")
RECIPE = ROOT / "configs" / "celeba40_mgda_ub.yaml"
BATCH = 256


def throughput(path: Path, workers: int, batches: int) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch) of one part's train stream."""
    source = ShardSource(path, workers=workers)
    start = time.perf_counter()
    stream = source.train_batches(
        seed=0, batch_size=BATCH, part=(0, 1), start_step=0, total_steps=batches + 1, device=CPU
    )
    next(stream)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * BATCH / (time.perf_counter() - start), first


def step_consumption(path: Path, steps: int) -> float:
    """Samples/s one single-process MGDA-UB ResNet-18 step of the recipe consumes (median step)."""
    from dist_mtl.build import build_balancer_for, build_model_for, build_optimizer
    from dist_mtl.reference import RepStep

    cfg = load_config(RECIPE, [f"data.path={path}"])
    source = ShardSource(path)
    model = build_model_for(cfg, source)
    step = RepStep(model, build_balancer_for(cfg), build_optimizer(cfg, list(model.parameters())))
    stream = source.train_batches(
        seed=0, batch_size=BATCH, part=(0, 1), start_step=0, total_steps=steps + 1, device=CPU
    )
    times = []
    for _ in range(steps + 1):
        batch = next(stream)
        start = time.perf_counter()
        step(batch.x, batch.y, StepRecorder())
        times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times[1:])


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import the training entry point (torch included): the
    part of the time to the first batch that no data set size changes."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import dist_mtl.train"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return time.perf_counter() - start


def recipe_run(path: Path, run_dir: Path, steps: int, width: int) -> list[str]:
    """Overrides of the recipe for a short measured run: 2 loader workers, every step logged."""
    return [
        f"data.path={path}",
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        f"model.width={width}",
        "data.workers=2",
        "train.log_every=1",
        "train.progress=false",
        "observe.tensorboard=false",
    ]


def run_memory(path: Path, run_dir: Path, steps: int, width: int) -> dict[str, float]:
    """Peak RSS (MB) of the rank and of its largest worker, and seconds from launch to the first
    batch in hand (step 1's end, less its compute: time/step - time/data of its record)."""
    overrides = [*recipe_run(path, run_dir, steps, width), "eval.batch_size=256"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_mtl.train", str(RECIPE), *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = run_dir / "metrics" / "rank0.jsonl"
    rank_peak, worker_peak, first_step, first_batch = 0, 0, None, None
    while proc.poll() is None:
        rank_peak = max(rank_peak, _status_kb(proc.pid, "VmHWM"))
        for child in _children(proc.pid):
            worker_peak = max(worker_peak, _status_kb(child, "VmRSS"))
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - start
            record = json.loads(metrics.read_text().splitlines()[0])
            first_batch = first_step - record["time/step"] + record["time/data"]
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return {
        "rank_peak_mb": rank_peak / 1024,
        "worker_peak_mb": worker_peak / 1024,
        "first_batch_s": first_batch,
        "first_step_s": first_step,
    }


def data_share(path: Path, run_dir: Path, steps: int, width: int) -> dict[str, float]:
    """Mean share of the `data` phase in the step on each rank of a 2-rank rep run (after 2 steps)."""
    overrides = recipe_run(path, run_dir, steps, width)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "dist_mtl.cli", "train", "--nproc", "2", str(RECIPE), *overrides],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shares = []
    for rank in (0, 1):
        records = [
            json.loads(line) for line in (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        ]
        records = [r for r in records if "time/step" in r][2:]
        shares.append(sum(r.get("time/data", 0.0) for r in records) / sum(r["time/step"] for r in records))
    return {"data_share_rank0": shares[0], "data_share_rank1": shares[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few batches")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    small, large = (500, 2000) if args.quick else (2000, 20000)
    batches = 3 if args.quick else 12
    results: dict[str, Any] = {"batch": BATCH, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        shards: dict[int, Path] = {}
        for n in (small, large):
            start = time.perf_counter()
            # --quick: small shards, so that its 2,000 images still give the 2-rank run a shard per part
            size = 250 if args.quick else DEFAULT_SHARD_SIZE
            shards[n] = make_celeba_like_shards(tmp_path / f"celeba{n}", n, seed=0, shard_size=size).parent
            results[f"generate_{n}_s"] = time.perf_counter() - start

        print(f"## Loader throughput ({large} generated images, batch {BATCH}, one data part)\n")
        print("| workers | samples/s | first batch (s) |\n|---|---|---|")
        for workers in (0, 1, 2):
            rate, first = throughput(shards[large], workers, batches)
            results[f"loader_workers{workers}_samples_per_s"] = rate
            results[f"loader_workers{workers}_first_batch_s"] = first
            print(f"| {workers} | {rate:,.0f} | {first:.2f} |")
        consumed = step_consumption(shards[small], 1 if args.quick else 2)
        results["resnet18_step_samples_per_s"] = consumed
        print(
            f"\nResNet-18 MGDA-UB step (recipe, width 64, one process) consumes {consumed:,.0f} samples/s\n"
        )

        # Width 16: the width-64 step takes about a minute on this CPU; memory of the data path does
        # not depend on the width.
        steps, width = (3, 8) if args.quick else (5, 16)
        print(f"## One rank, {steps}-step run of the recipe (width {width}), data.workers=2\n")
        print("| images | rank peak RSS (MB) | largest worker RSS (MB) | launch to first batch (s) ", end="")
        print("| to step 1 end (s) |")
        print("|---|---|---|---|---|")
        for n in (small, large):
            memory = run_memory(shards[n], tmp_path / f"run{n}", steps, width)
            results[f"memory_{n}"] = memory
            print(
                f"| {n:,} | {memory['rank_peak_mb']:.0f} | {memory['worker_peak_mb']:.0f} | "
                f"{memory['first_batch_s']:.1f} | {memory['first_step_s']:.1f} |"
            )
        results["import_s"] = import_seconds()
        imported = results["import_s"]
        print(f"\n(of the time to the first batch, importing torch and the entry point: {imported:.1f} s)")
        growth = results[f"memory_{large}"]["rank_peak_mb"] / results[f"memory_{small}"]["rank_peak_mb"]
        results["rank_peak_growth"] = growth
        print(f"\nrank peak RSS {large:,} / {small:,} images: {growth:.3f}x\n")

        share_steps, share_width = (4, 8) if args.quick else (8, 16)
        share = data_share(shards[large], tmp_path / "share", share_steps, share_width)
        results["data_share"] = share
        print(f"## 2 ranks (MGDA-UB, width {share_width}, 2 workers each): share of `data` in the step\n")
        rank0, rank1 = (100 * share[f"data_share_rank{r}"] for r in (0, 1))
        print(f"rank 0: {rank0:.1f} %, rank 1: {rank1:.1f} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
