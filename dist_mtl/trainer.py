"""The training loop: data -> step -> log -> eval -> checkpoint, and the run directory it writes.

Data comes from a batch source (`dist_mtl.data.MemorySource` for the bundled sets, the streamed
`ShardSource` for shard directories) whose batches are a pure function of (seed, step, data part),
so a resumed run sees exactly the batches an uninterrupted run would. Each rank reads only its
part of every global batch (`Backend.data_part`).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dist_mtl.backend import Backend, SingleProcess
from dist_mtl.build import (
    build_balancer_for,
    build_model_for,
    build_optimizer,
    build_source,
    resolve_device,
)
from dist_mtl.checkpoint import load_latest_checkpoint, save_checkpoint
from dist_mtl.config import RunConfig, config_to_dict, save_config
from dist_mtl.data import BatchSource, MemorySource, MultiTaskDataset
from dist_mtl.errors import CheckpointError, RunDirError, TrainingFailed
from dist_mtl.gradients import labelled_counts
from dist_mtl.metrics import evaluate, load_baseline, metric_scalars, summary_metrics
from dist_mtl.observe import JsonlSink, MetricSink, MultiSink, ProfilerWindow, StepRecorder, TensorBoardSink
from dist_mtl.observe.gramians import truncate_gramians, write_gramian
from dist_mtl.reference import StepResult
from dist_mtl.rundir import check_resumable, prepare_run_dir, truncate_records
from dist_mtl.stop import RunStopped, StopRequest


def total_steps(cfg: RunConfig, per_epoch: int) -> int:
    return cfg.train.steps or cfg.train.epochs * per_epoch


def learning_rate(cfg: RunConfig, step: int, per_epoch: int) -> float:
    """optim.lr, multiplied by optim.lr_decay once every optim.decay_every epochs (a pure function
    of the step, so a resumed run needs no scheduler state)."""
    o = cfg.optim
    if not o.decay_every:
        return o.lr
    return o.lr * o.lr_decay ** ((step // per_epoch) // o.decay_every)


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
    datasets: BatchSource | tuple[MultiTaskDataset, MultiTaskDataset] | None = None,
) -> dict[str, Any]:
    """Run training as configured; returns (and on rank 0 writes) the run summary.

    `backend` defaults to one process on train.device; `datasets` (a batch source, or in-memory
    (train, test) splits) to building the source from the config. `overwrite` allows training into
    a run directory that already holds a run, without `resume`.
    """
    rt = backend or SingleProcess(resolve_device(cfg.train.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    source = build_source(cfg) if datasets is None else datasets
    if isinstance(source, tuple):
        source = MemorySource(*source)
    model = build_model_for(cfg, source).to(rt.device)
    balancer = build_balancer_for(cfg)
    optimizer = build_optimizer(cfg, list(model.parameters()))
    step_fn = rt.make_step(cfg, model, balancer, optimizer)
    tasks = source.tasks
    task_names = [t.name for t in tasks]
    batch_size, part = cfg.data.batch_size, rt.data_part
    per_epoch = source.steps_per_epoch(batch_size, part[1])
    n_steps = total_steps(cfg, per_epoch)
    baseline = load_baseline(cfg.eval.baseline, task_names) if cfg.eval.baseline else None

    config = config_to_dict(cfg)

    # Every check that can refuse the run happens before anything is written (or created).
    start_step, skipped, history, restarts, wall_before, first_skipped = 0, 0, [], 0, 0.0, []
    # Run totals of the per-step solver events (unconverged solves, capped GetMTL steps, degenerate
    # branches): counted on every step, so a record shows what happened between logged steps too.
    events: dict[str, int] = {}
    # Data counts of the whole run: [corrupt samples masked (data.on_error=skip), labelled samples per
    # task], as of the checkpoint resumed from; this part's counts since this (re)start are added by
    # `run_data_counts`. Corrupt samples are counted on the host (the loader reports them), labelled
    # samples on the device, so counting costs no host copy.
    data_before = [0.0] * (1 + len(tasks))
    skipped_samples = 0
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
        data_before = json.loads(ckpt.get("data_counts", "null")) or data_before
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, writer=rt.rank == 0)
    rt.barrier()  # rank 0 may have replaced an old run (--overwrite): nobody writes before that is done
    if rt.rank == 0:
        save_config(cfg, run_dir / "config.yaml")

    if resume and rt.rank == 0:
        truncate_gramians(run_dir, start_step)
    labelled_seen = torch.zeros(len(tasks), dtype=torch.float64, device=rt.device)
    ranks_per_part = rt.world_size // part[1]  # the ranks of one part read the same samples

    def run_data_counts() -> list[float]:
        """The run's data counts over every part (a collective: every rank calls it)."""
        skipped_here = torch.tensor([float(skipped_samples)], dtype=torch.float64, device=rt.device)
        total = torch.cat([skipped_here, labelled_seen])
        rt.all_reduce(total)
        return [b + n / ranks_per_part for b, n in zip(data_before, total.cpu().tolist(), strict=True)]

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
        counts = json.dumps(run_data_counts())
        if rt.rank == 0:
            extra = {
                "data_position": json.dumps(source.position(step, batch_size, part[1])),
                "data_counts": counts,
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

    def run_eval(step: int, *, log: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        rt.gather_model()
        batches = source.eval_batches(
            batch_size=cfg.eval.batch_size, part=(rt.rank, rt.world_size), device=rt.device
        )
        metrics = evaluate(model, ((b.x, b.y) for b in batches), rt.device, tasks, all_reduce=rt.all_reduce)
        overall = summary_metrics(metrics, baseline)
        if rt.rank == 0 and log:
            flat = metric_scalars(metrics, overall)
            sinks.write(step, flat)
            history.append({"step": step, **flat})
        return metrics, overall

    stop = StopRequest()  # preemption / requeue / pre-timeout signals, inside a SLURM job only
    try:
        with profiler, contextlib.ExitStack() as stack:
            stack.enter_context(stop.installed())
            # One iterator for the whole run (its loader workers live across epochs); closing it stops
            # them at once, also when a step fails.
            batches = stack.enter_context(
                contextlib.closing(
                    source.train_batches(
                        seed=cfg.seed,
                        batch_size=batch_size,
                        part=part,
                        start_step=start_step,
                        total_steps=n_steps,
                        device=rt.device,
                    )
                )
            )
            for step in range(start_step, n_steps):
                with rec.phase("data"):
                    batch = next(batches)
                    skipped_samples += batch.skipped
                    labelled = labelled_counts(batch.y)
                    labelled_seen += labelled
                for group in optimizer.param_groups:  # one group: the schedule is a function of the step
                    group["lr"] = learning_rate(cfg, step, per_epoch)
                result = step_fn(batch.x, batch.y, rec)
                profiler.step()
                record = rec.end_step(step + 1)
                done = step + 1
                guard.record(done, result.skipped)
                for name, count in result.solution.events.items():
                    events[name] = events.get(name, 0) + count
                if done % cfg.train.log_every == 0 or done == n_steps:
                    totals = {f"total/{name}": count for name, count in events.items()}
                    counts = {"skipped_steps": guard.skipped, "restart": restarts, **totals}
                    counts["data/skipped_samples"] = skipped_samples
                    counts["lr"] = optimizer.param_groups[0]["lr"]
                    seen = labelled.cpu().tolist()  # this part's batch: one copy per logged step
                    counts |= {f"labelled/{name}": n for name, n in zip(task_names, seen, strict=True)}
                    sinks.write(done, {**record, **step_scalars(result, task_names), **counts})
                    if result.solution.gramian is not None and cfg.observe.jsonl:
                        write_gramian(run_dir, done, result.solution.gramian)
                    bar.set_postfix(loss=f"{float(result.solution.losses.mean()):.4f}", skipped=guard.skipped)
                bar.update(1)
                epoch_end = done % per_epoch == 0
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or (
                    not cfg.train.eval_every and epoch_end and done != n_steps
                ):
                    run_eval(done)
                checkpointed = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
                if checkpointed and done != n_steps:
                    checkpoint(done)
                agreed = rt.stop_vote.vote(stop.reason)
                if agreed and done != n_steps:  # every rank sees the same `agreed` after the same step
                    rt.stop_vote.settle()
                    if not checkpointed:
                        checkpoint(done)
                    raise RunStopped(done, agreed, stop.signal_name)
            rt.stop_vote.settle()
        bar.close()
        # Resuming a finished run only re-reads its result: its final evaluation and checkpoint exist.
        finished = start_step == n_steps
        final, overall = run_eval(n_steps, log=not finished)
        if not finished:
            checkpoint(n_steps)
        data_totals = run_data_counts()
        summary = {
            "tasks": final,
            "metrics": overall,
            "data": {
                "skipped_samples": round(data_totals[0]),
                "labelled_seen": dict(zip(task_names, map(round, data_totals[1:]), strict=True)),
            },
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
            if cfg.observe.tensorboard and cfg.observe.figures and not finished:
                log_report_figures(run_dir, n_steps)
        return summary
    finally:
        sinks.close()


def log_report_figures(run_dir: Path, step: int) -> None:
    """The `dist-mtl report` figures of the finished run into TensorBoard; a failure to draw them is a
    warning, since the run itself succeeded and its results are written."""
    from dist_mtl.observe.run_report import log_figures, run_figures  # matplotlib: imported only here

    try:
        log_figures(run_dir / "tb", step, run_figures(run_dir))
    except (RunDirError, OSError, ValueError) as exc:
        warnings.warn(f"the report figures were not written to TensorBoard: {exc}", stacklevel=2)


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [
        f"steps {summary['steps']}  wall {summary['wall_time_s']:.1f}s  skipped {summary['skipped_steps']}"
    ]
    for name, m in summary["tasks"].items():
        if "accuracy" not in m:  # no labelled test sample for this task
            lines.append(f"  {name:<24} no labelled test samples")
            continue
        f1 = f"  f1 {m['f1']:.4f}" if "f1" in m else ""
        lines.append(f"  {name:<24} loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}{f1}")
    for name, value in summary.get("metrics", {}).items():
        lines.append(f"  {name} {value:.4f}")
    return "\n".join(lines)
