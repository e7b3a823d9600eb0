"""Issue 8's distribution-overhead target, measured with the CLI and the step records.

The 2-rank T = 8 `gramian` step on a 3M-parameter MLP (synthetic data, input 3072, hidden [768, 768],
rep 256, batch 64, one thread per process, SGD) against a 1-process run doing the same per-rank compute
(T = 4: one forward and 4 backward passes, no exchange). Both runs go through `dist-mtl train`; each
step's time comes from the JSONL step records (`time/step`, the slower rank's for 2 ranks), the first
`--warmup` steps dropped, and the ratio of the medians is printed. The runs alternate `--rounds` times
(1p, 2r, 1p, 2r, ...) so that a change in the machine's load hits both; the ratio of every round and
their median are printed. Extra `section.key=value` overrides after `--` go to both runs (for example
`-- engine.overlap=false` for the non-overlapped engine).

Run: python3 bench/distribution_overhead.py [--steps 40] [--warmup 8] [--rounds 3] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "data.name=synthetic",
    "data.input_dim=3072",
    "data.train_size=2048",
    "data.test_size=64",
    "data.batch_size=64",
    "model.encoder=mlp",
    "model.hidden=[768,768]",
    "model.rep_dim=256",
    "balancer.name=mgda",
    "optim.name=sgd",
    "optim.lr=0.001",
    "optim.momentum=0.9",
    "train.threads=1",
    "train.log_every=1",
    "train.progress=false",
    "train.eval_every=0",
    "observe.tensorboard=false",
    "observe.figures=false",
    "engine.checksum_every=0",
]


def run(run_dir: Path, tasks: int, nproc: int, steps: int, extra: list[str]) -> list[float]:
    """Per step, the slowest rank's `time/step` (seconds)."""
    overrides = [*COMMON, f"data.num_tasks={tasks}", f"train.steps={steps}", f"run_dir={run_dir}", *extra]
    if nproc == 1:  # engine options do not apply to one process
        overrides = [o for o in overrides if not o.startswith("engine.")]
    cmd = [sys.executable, "-m", "dist_mtl.cli", "train", *overrides, "--overwrite"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    per_rank = []
    for rank in range(nproc):
        lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        per_rank.append({r["step"]: r["time/step"] for r in records if "time/step" in r})
    return [max(times[s] for times in per_rank) for s in sorted(per_rank[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="section.key=value for both runs (after --)")
    ns = parser.parse_args()
    if ns.warmup >= ns.steps:
        parser.error("--warmup must be below --steps")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.rounds):
            one = run(Path(tmp, f"1p-{i}"), 4, 1, ns.steps, ns.overrides)[ns.warmup :]
            two = run(Path(tmp, f"2r-{i}"), 8, 2, ns.steps, ns.overrides)[ns.warmup :]
            a, b = 1e3 * statistics.median(one), 1e3 * statistics.median(two)
            ratios.append(b / a)
            print(
                f"round {i + 1}: 1p T=4 {a:.1f} ms, 2r T=8 gramian {b:.1f} ms, ratio {b / a:.3f}", flush=True
            )
    extra = f" with {' '.join(ns.overrides)}" if ns.overrides else ""
    print(
        f"distribution overhead{extra}: median ratio {statistics.median(ratios):.3f} over {ns.rounds} rounds "
        f"(target <= 1.15; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())})"
    )


if __name__ == "__main__":
    main()
