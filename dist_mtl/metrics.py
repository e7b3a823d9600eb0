"""Evaluation metrics as the multi-task literature reports them, with missing labels excluded.

A label of -1 means "this sample has no label for this task" (CelebA-style partial annotation); such
entries count nowhere: not in the loss, the accuracy, the F1 or the labelled count. Per-task sums
stay on the device as one (6, T) float64 tensor, so an evaluation pass never syncs with the host
until `finalize`, and several processes combine their shares with one in-place all-reduce (a sum).

Reported per task: `loss` (mean cross-entropy over labelled samples), `accuracy`, `error`
(1 - accuracy: the MGDA paper's CelebA figure), `labelled`, and for binary tasks `f1` of class 1.
Across tasks: `average_error` and, against single-task baselines, Delta-m% (Maninis et al. 2019,
as in LibMTL): 100/T * sum_t (err_t - err_base,t) / err_base,t, so lower is better and a
multi-task model that is worse than its single-task baselines has a positive Delta-m.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dist_mtl.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: keeps this module importable without the data package
    from dist_mtl.data import TaskSpec
    from dist_mtl.models import MultiTaskModel

MISSING_LABEL = -1
# Rows of the (6, T) sums.
LOSS, CORRECT, LABELLED, TP, FP, FN = range(6)
ROWS = 6


class MetricSums:
    """Per-task sums over the batches seen so far, on the device, in float64.

    Rows: cross-entropy summed over labelled samples, correct predictions, labelled samples, and
    for binary tasks (2 logits) true positives, false positives and false negatives of class 1 (zero
    for other tasks). float64 keeps counts exact up to 2^53 samples. `tensor` is the storage itself,
    so `all_reduce(sums.tensor)` (an in-place sum over processes) combines the shares of the ranks.
    """

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu") -> None:
        self.tensor = torch.zeros(ROWS, num_tasks, dtype=torch.float64, device=device)
        self._group_key: tuple[int, ...] | None = None
        self._group_cache: list[tuple[int, list[int], torch.Tensor]] = []

    @property
    def num_tasks(self) -> int:
        return self.tensor.shape[1]

    @torch.no_grad()
    def add(self, logits: Sequence[torch.Tensor], y: torch.Tensor) -> None:
        """Add one batch: `logits[t]` is (B, C_t), `y` is int64 (B, T) with -1 where a label is missing.

        No host synchronisation: every count stays a device tensor.
        """
        if len(logits) != self.num_tasks or y.dim() != 2 or y.shape[1] != self.num_tasks:
            raise ValueError(
                f"expected {self.num_tasks} logit tensors and labels of shape (B, {self.num_tasks}); "
                f"got {len(logits)} tensors and labels of shape {tuple(y.shape)}"
            )
        for classes, tasks, index in self._groups(logits):
            # The tasks with `classes` logits as one (B, G, C) block: a few kernels for all of them,
            # not a few per task (T reaches 1000 on the synthetic data). argmax runs over the
            # contiguous last axis (over a strided one it is ~10x slower on CPU).
            block = torch.stack([logits[t] for t in tasks], dim=1).float()
            target = y.index_select(1, index)
            labelled = target != MISSING_LABEL
            pred = block.argmax(dim=2)
            loss = F.cross_entropy(
                block.transpose(1, 2), target, ignore_index=MISSING_LABEL, reduction="none"
            ).sum(0)
            rows = [loss, ((pred == target) & labelled).sum(0), labelled.sum(0)]
            if classes == 2:
                positive, negative = target == 1, target == 0
                rows += [
                    (pred.eq(1) & positive).sum(0),
                    (pred.eq(1) & negative).sum(0),
                    (pred.eq(0) & positive).sum(0),
                ]
            else:  # tp/fp/fn are defined for binary tasks only
                rows += [torch.zeros_like(rows[-1])] * 3
            self.tensor.index_add_(1, index, torch.stack([r.to(torch.float64) for r in rows]))

    def _groups(self, logits: Sequence[torch.Tensor]) -> list[tuple[int, list[int], torch.Tensor]]:
        """(classes, tasks, tasks as a device index) per number of classes; the index tensors are made
        on the first batch only, so later batches copy nothing from the host."""
        shape = tuple(out.shape[1] for out in logits)
        if self._group_key != shape:
            by_classes: dict[int, list[int]] = {}
            for t, classes in enumerate(shape):
                by_classes.setdefault(classes, []).append(t)
            device = self.tensor.device
            self._group_cache = [
                (classes, tasks, torch.tensor(tasks, dtype=torch.int64, device=device))
                for classes, tasks in by_classes.items()
            ]
            self._group_key = shape
        return self._group_cache


def finalize(sums: MetricSums | torch.Tensor, tasks: Sequence[TaskSpec]) -> dict[str, dict[str, float]]:
    """Per-task metrics from the sums, with one copy to the host.

    A task with no labelled sample in the split reports only `labelled: 0` (no NaN reaches JSON or
    TensorBoard) and the cross-task averages leave it out. F1 (binary tasks only) is 2tp/(2tp+fp+fn)
    and is defined as 0.0 when that is 0/0 (no positive label and no positive prediction), as
    scikit-learn's `zero_division=0` does.
    """
    tensor = sums.tensor if isinstance(sums, MetricSums) else sums
    if tensor.shape != (ROWS, len(tasks)):
        raise ValueError(f"expected sums of shape ({ROWS}, {len(tasks)}); got {tuple(tensor.shape)}")
    rows = tensor.detach().to("cpu", torch.float64).tolist()
    out: dict[str, dict[str, float]] = {}
    for t, spec in enumerate(tasks):
        n = rows[LABELLED][t]
        if n <= 0:
            out[spec.name] = {"labelled": 0}
            continue
        accuracy = rows[CORRECT][t] / n
        metrics = {
            "loss": rows[LOSS][t] / n,
            "accuracy": accuracy,
            "error": 1.0 - accuracy,
            "labelled": int(n),
        }
        if spec.num_classes == 2:
            tp, fp, fn = rows[TP][t], rows[FP][t], rows[FN][t]
            denominator = 2 * tp + fp + fn
            metrics["f1"] = 2 * tp / denominator if denominator > 0 else 0.0
        out[spec.name] = metrics
    return out


def task_error(metrics: Mapping[str, Any]) -> float | None:
    """A task's test error: `error`, else 1 - `accuracy` (older summaries); None without labels."""
    if metrics.get("labelled", 1) == 0:
        return None
    if "error" in metrics:
        return float(metrics["error"])
    if "accuracy" in metrics:
        return 1.0 - float(metrics["accuracy"])
    return None


def _labelled_errors(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    errors = {name: task_error(m) for name, m in metrics.items()}
    return {name: e for name, e in errors.items() if e is not None}


def average_error(metrics: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean test error over the tasks that have labelled samples (the MGDA paper's CelebA metric)."""
    errors = _labelled_errors(metrics)
    if not errors:
        raise ValueError("no task has labelled samples: the average error is undefined")
    return sum(errors.values()) / len(errors)


def delta_m(metrics: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, float]) -> float:
    """Delta-m% against single-task errors: 100/T sum_t (err_t - base_t) / base_t over labelled tasks.

    Errors are lower-is-better, so this is Maninis et al.'s (-1)^l_t (M_t - M_b,t) / M_b,t with
    accuracy = 1 - error; negative means the multi-task model beats its single-task baselines.
    Every task must have a baseline (a ConfigError names the first that has none).
    """
    for name in metrics:
        if name not in baseline:
            known = ", ".join(sorted(baseline)) or "none"
            raise ConfigError(f"eval.baseline: task {name!r} has no baseline error (baseline tasks: {known})")
        if not (math.isfinite(baseline[name]) and baseline[name] > 0):
            raise ConfigError(
                f"eval.baseline: task {name!r}: baseline error {baseline[name]!r} must be > 0 and finite "
                "(Delta-m divides by it)"
            )
    errors = _labelled_errors(metrics)
    if not errors:
        raise ValueError("no task has labelled samples: Delta-m is undefined")
    return 100.0 / len(errors) * sum((e - baseline[name]) / baseline[name] for name, e in errors.items())


def summary_metrics(
    metrics: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Cross-task numbers for summary.json, logs and TensorBoard: `average_error`, `delta_m` with a
    baseline. Both are left out when no task has labelled samples (nothing to average)."""
    if not _labelled_errors(metrics):
        return {}
    out = {"average_error": average_error(metrics)}
    if baseline is not None:
        out["delta_m"] = delta_m(metrics, baseline)
    return out


def metric_scalars(
    metrics: Mapping[str, Mapping[str, Any]], summary: Mapping[str, float] | None = None, prefix: str = "test"
) -> dict[str, float]:
    """Flat `prefix/<metric>/<task>` and `prefix/<summary key>` scalars for the metric sinks."""
    flat = {f"{prefix}/{key}/{task}": float(value) for task, m in metrics.items() for key, value in m.items()}
    flat.update({f"{prefix}/{key}": float(value) for key, value in (summary or {}).items()})
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _baseline_error(entry: Any) -> tuple[float | None, str]:
    """The error of one baseline entry and, when there is none, why."""
    if isinstance(entry, Mapping):
        if entry.get("labelled", 1) == 0:
            return None, "the baseline run had no labelled samples for it"
        if "error" in entry:
            value = _number(entry["error"])
            return value, f"'error' is {entry['error']!r}, not a number"
        if "accuracy" in entry:
            accuracy = _number(entry["accuracy"])
            if accuracy is None:
                return None, f"'accuracy' is {entry['accuracy']!r}, not a number"
            return 1.0 - accuracy, ""
        return None, "expected an 'error' or 'accuracy' key"
    value = _number(entry)
    return value, f"{entry!r} is not a number"


def load_baseline(path: str | Path, task_names: Sequence[str] | None = None) -> dict[str, float]:
    """Single-task test errors per task, for Delta-m, from a dist_mtl summary.json or a plain JSON map.

    Accepted: a run's summary.json ({"tasks": {task: {"error": e} or {"accuracy": a}}}), or
    {task: e} or {task: {"error": e}}. Errors are fractions in (0, 1]: 0 would make Delta-m divide
    by zero, and a value above 1 is most likely a percentage. With `task_names`, each must be present.
    Every problem is a ConfigError naming the file (and the task).
    """
    where = f"eval.baseline: {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("tasks"), Mapping):
        data = data["tasks"]
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"{where}: expected a JSON object of task errors ({{task: error}}) or a dist_mtl summary.json"
        )
    baseline = {}
    for name, entry in data.items():
        error, why = _baseline_error(entry)
        if error is None:
            raise ConfigError(f"{where}: task {name!r}: {why}")
        if not math.isfinite(error) or not 0.0 < error <= 1.0:
            hint = " (a percentage? give fractions)" if error > 1.0 else " (Delta-m divides by it)"
            raise ConfigError(f"{where}: task {name!r}: error {error!r} must be in (0, 1]{hint}")
        baseline[str(name)] = error
    for name in task_names or ():
        if name not in baseline:
            raise ConfigError(f"{where}: task {name!r}: missing (the file has {', '.join(sorted(baseline))})")
    return baseline


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    tasks: Sequence[TaskSpec],
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task metrics over this process's batches, combined over processes by `all_reduce`.

    The batches (x float32 normalised, y int64 with -1 for missing labels) are already on `device`.
    The model runs in eval mode and gets its previous mode back, even on error. Every process must
    call this (with its own share of the split) when `all_reduce` is a collective.
    """
    sums = MetricSums(len(tasks), device)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            sums.add(model(x), y)
    finally:
        model.train(was_training)
    if all_reduce is not None:
        all_reduce(sums.tensor)
    return finalize(sums, tasks)
