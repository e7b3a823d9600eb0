"""The training loop: data -> step -> log -> eval -> checkpoint, and the run directory it writes.

Batches are a pure function of (seed, step): the epoch's permutation comes from a generator seeded
by (seed, epoch). A resumed run therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dist_mtl.backend import Backend, SingleProcess
from dist_mtl.build import (
    build_balancer_for,
    build_datasets,
    build_model_for,
    build_optimizer,
    resolve_device,
)
from dist_mtl.checkpoint import load_latest_checkpoint, save_checkpoint
from dist_mtl.config import RunConfig, config_to_dict, save_config
from dist_mtl.data import MultiTaskDataset
from dist_mtl.errors import CheckpointError, ConfigError, TrainingFailed
from dist_mtl.gradients import task_losses
from dist_mtl.models import MultiTaskModel
from dist_mtl.observe import JsonlSink, MetricSink, MultiSink, ProfilerWindow, StepRecorder, TensorBoardSink
from dist_mtl.reference import StepResult
from dist_mtl.rundir import check_resumable, prepare_run_dir, truncate_records


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    if batch_size > num_samples:
        raise ConfigError(
            f"data.batch_size {batch_size} exceeds the {num_samples} training samples; "
            f"use at most {num_samples}"
        )
    return num_samples // batch_size


def total_steps(cfg: RunConfig, num_samples: int) -> int:
    return cfg.train.steps or cfg.train.epochs * steps_per_epoch(num_samples, cfg.data.batch_size)


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch of `step`: drop-last batches of a per-epoch seeded permutation."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=gen)
    return perm[i * batch_size : (i + 1) * batch_size]


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    data: MultiTaskDataset,
    device: torch.device,
    batch_size: int = 1024,
    *,
    part: tuple[int, int] = (0, 1),
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task mean loss and accuracy on a whole split.

    With `part` = (index, parts) this process evaluates only its contiguous share of the split and
    `all_reduce` (an in-place sum over the processes) combines the sums, so evaluation is spread
    over the ranks instead of leaving them idle behind rank 0. Sums stay on the device until the end.
    """
    was_training = model.training
    model.eval()
    index, parts = part
    n = len(data)
    sums = torch.zeros(2, len(data.tasks), dtype=torch.float64, device=device)  # loss sums, correct counts
    for start in range(n * index // parts, n * (index + 1) // parts, batch_size):
        stop = min(start + batch_size, n * (index + 1) // parts)
        x = data.x[start:stop].to(device)
        y = data.y[start:stop].to(device)
        logits = model(x)
        sums[0] += task_losses(logits, y).double() * (stop - start)
        sums[1] += torch.stack([(out.argmax(1) == y[:, i]).sum() for i, out in enumerate(logits)]).double()
    if all_reduce is not None:
        all_reduce(sums)
    model.train(was_training)
    means = (sums / n).cpu().tolist()
    return {spec.name: {"loss": means[0][i], "accuracy": means[1][i]} for i, spec in enumerate(data.tasks)}


def make_sinks(cfg: RunConfig, rank: int, world_size: int, resumed_at: int | None) -> MetricSink:
    """JSONL (every rank) and TensorBoard (rank 0); on resume both forget steps after the checkpoint.

    Each rank cuts its own file; rank 0 also cuts the files of ranks that a resume on fewer ranks no
    longer has, so `dist-mtl profile` never reads steps the resumed run replaced.
    """
    sinks: list[MetricSink] = []
    run_dir = Path(cfg.run_dir)
    if cfg.observe.jsonl:
        path = run_dir / "metrics" / f"rank{rank}.jsonl"
        if resumed_at is not None:
            truncate_records(path, resumed_at)
            if rank == 0:
                for other in (run_dir / "metrics").glob("rank*.jsonl"):
                    index = other.stem.removeprefix("rank")
                    if index.isdigit() and int(index) >= world_size:
                        truncate_records(other, resumed_at)
        sinks.append(JsonlSink(path))
    if cfg.observe.tensorboard and rank == 0:
        purge = None if resumed_at is None else resumed_at + 1
        sinks.append(TensorBoardSink(run_dir / "tb", purge_step=purge))
    return MultiSink(sinks)


class SkipGuard:
    """Stops a run whose steps are mostly skipped (non-finite Gramian or losses) instead of exiting 0.

    Checked after every step once `grace` steps (or all of a shorter run) have run, so a few early
    non-finite steps do not end a run, but a diverged one stops within a few steps, not at the end.
    """

    grace = 10
    listed = 8

    def __init__(self, max_fraction: float, total: int, skipped: int, first: list[int], lr: float) -> None:
        self.max_fraction, self.skipped, self.first, self.lr = max_fraction, skipped, list(first), lr
        self.grace = min(self.grace, total)

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            if len(self.first) < self.listed:
                self.first.append(step)
        if step >= self.grace and self.skipped > self.max_fraction * step:
            listed = ", ".join(map(str, self.first)) + (", ..." if self.skipped > len(self.first) else "")
            raise TrainingFailed(
                f"{self.skipped} of {step} steps were skipped (steps {listed}): the Gramian or the losses "
                f"were not finite, above train.max_skipped_fraction={self.max_fraction:g}. Likely cause: the "
                f"parameters diverged (optim.lr={self.lr:g} too high?) or the inputs hold NaN/Inf; the last "
                "checkpoint written before this is left as it was"
            )


def step_scalars(result: StepResult, task_names: list[str]) -> dict[str, float]:
    """Losses, weights and solver diagnostics for one step (already on the host)."""
    sol = result.solution
    out = {**sol.info, **sol.diagnostics()}
    losses = sol.losses.tolist()
    weights = sol.coefficients.tolist()
    for name, loss, w in zip(task_names, losses, weights, strict=True):
        out[f"loss/{name}"] = loss
        out[f"weight/{name}"] = w
    out["loss/mean"] = sum(losses) / len(losses)
    return out


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    backend: Backend | None = None,
    datasets: tuple[MultiTaskDataset, MultiTaskDataset] | None = None,
) -> dict[str, Any]:
    """Run training as configured; returns (and on rank 0 writes) the run summary.

    `backend` defaults to one process on train.device; `datasets` to building them from the config.
    `overwrite` allows training into a run directory that already holds a run, without `resume`.
    """
    rt = backend or SingleProcess(resolve_device(cfg.train.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    train_set, test_set = datasets or build_datasets(cfg)
    model = build_model_for(cfg, train_set).to(rt.device)
    balancer = build_balancer_for(cfg)
    optimizer = build_optimizer(cfg, list(model.parameters()))
    step_fn = rt.make_step(cfg, model, balancer, optimizer)
    task_names = [t.name for t in train_set.tasks]
    n_steps = total_steps(cfg, len(train_set))
    per_epoch = steps_per_epoch(len(train_set), cfg.data.batch_size)

    config = config_to_dict(cfg)

    # Every check that can refuse the run happens before anything is written (or created).
    start_step, skipped, history, restarts, wall_before, first_skipped = 0, 0, [], 0, 0.0, []
    # Run totals of the per-step solver events (unconverged solves, capped GetMTL steps, degenerate
    # branches): counted on every step, so a record shows what happened between logged steps too.
    events: dict[str, int] = {}
    if resume:
        ckpt, _ = load_latest_checkpoint(run_dir)
        saved = json.loads(ckpt["config"]) if "config" in ckpt else None
        check_resumable(saved, config, ckpt["step"], n_steps)
        try:
            rt.load_state_dict(ckpt)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"--resume: the checkpoint does not fit this run's model or balancer: {exc}"
            ) from exc
        start_step, skipped, history = (
            ckpt["step"],
            ckpt.get("skipped", 0),
            json.loads(ckpt.get("history", "[]")),
        )
        restarts, wall_before = ckpt.get("restarts", 0) + 1, ckpt.get("wall_time_s", 0.0)
        first_skipped = json.loads(ckpt.get("first_skipped", "[]"))
        events = json.loads(ckpt.get("events", "{}"))
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, writer=rt.rank == 0)
    rt.barrier()  # rank 0 may have replaced an old run (--overwrite): nobody writes before that is done
    if rt.rank == 0:
        save_config(cfg, run_dir / "config.yaml")

    sinks = make_sinks(cfg, rt.rank, rt.world_size, start_step if resume else None)
    guard = SkipGuard(cfg.train.max_skipped_fraction, n_steps, skipped, first_skipped, cfg.optim.lr)
    sync = torch.cuda.synchronize if (cfg.observe.sync_cuda and rt.device.type == "cuda") else None
    rec = StepRecorder(sync=sync)
    profiler = ProfilerWindow(
        # One trace per rank: ranks writing the same file race and lose traces.
        run_dir / "profile" / (f"rank{rt.rank}" if rt.world_size > 1 else ""),
        cfg.observe.profiler_start,
        cfg.observe.profiler_steps or 1,
        enabled=cfg.observe.profiler_steps > 0,
    )
    bar = tqdm(
        total=n_steps,
        initial=start_step,
        disable=not (cfg.train.progress and rt.rank == 0),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()

    def wall_time() -> float:
        return wall_before + time.perf_counter() - started

    def checkpoint(step: int) -> None:
        rt.gather_model()
        st = rt.state_dict()
        if rt.rank == 0:
            extra = {
                "skipped": guard.skipped,
                "first_skipped": json.dumps(guard.first),
                "events": json.dumps(events),
                "history": json.dumps(history),
                "config": json.dumps(config),
                "restarts": restarts,
                "wall_time_s": wall_time(),
            }
            save_checkpoint(run_dir, step, {**st, **extra})
        rt.barrier()

    def run_eval(step: int, *, log: bool = True) -> dict[str, dict[str, float]]:
        rt.gather_model()
        metrics = evaluate(
            model, test_set, rt.device, part=(rt.rank, rt.world_size), all_reduce=rt.all_reduce
        )
        if rt.rank == 0 and log:
            flat = {f"test/{k}/{task}": v[k] for task, v in metrics.items() for k in ("loss", "accuracy")}
            sinks.write(step, flat)
            history.append({"step": step, **flat})
        return metrics

    try:
        with profiler:
            for step in range(start_step, n_steps):
                with rec.phase("data"):
                    idx = batch_indices(len(train_set), cfg.data.batch_size, cfg.seed, step)
                    x = train_set.x[idx].to(rt.device, non_blocking=True)
                    y = train_set.y[idx].to(rt.device, non_blocking=True)
                result = step_fn(x, y, rec)
                profiler.step()
                record = rec.end_step(step + 1)
                done = step + 1
                guard.record(done, result.skipped)
                for name, count in result.solution.events.items():
                    events[name] = events.get(name, 0) + count
                if done % cfg.train.log_every == 0 or done == n_steps:
                    totals = {f"total/{name}": count for name, count in events.items()}
                    counts = {"skipped_steps": guard.skipped, "restart": restarts, **totals}
                    sinks.write(done, {**record, **step_scalars(result, task_names), **counts})
                    bar.set_postfix(loss=f"{float(result.solution.losses.mean()):.4f}", skipped=guard.skipped)
                bar.update(1)
                epoch_end = done % per_epoch == 0
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or (
                    not cfg.train.eval_every and epoch_end and done != n_steps
                ):
                    run_eval(done)
                if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done != n_steps:
                    checkpoint(done)
        bar.close()
        # Resuming a finished run only re-reads its result: its final evaluation and checkpoint exist.
        finished = start_step == n_steps
        final = run_eval(n_steps, log=not finished)
        if not finished:
            checkpoint(n_steps)
        summary = {
            "tasks": final,
            "steps": n_steps,
            "resumed_from": start_step,
            "restarts": restarts,
            "skipped_steps": guard.skipped,
            "events": events,  # run totals; on rank 0, which solves
            "wall_time_s": wall_time(),  # over every (re)start of the run
            "world_size": rt.world_size,
            "config": config,
        }
        if rt.rank == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        sinks.close()


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [
        f"steps {summary['steps']}  wall {summary['wall_time_s']:.1f}s  skipped {summary['skipped_steps']}"
    ]
    for name, m in summary["tasks"].items():
        lines.append(f"  {name:<24} loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}")
    return "\n".join(lines)
