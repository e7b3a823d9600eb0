"""Evaluation metrics: hand (numpy) values, missing labels, sums over parts, Delta-m and baseline files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_mtl.data import MemorySource, MultiTaskDataset, TaskSpec
from dist_mtl.errors import ConfigError
from dist_mtl.metrics import (
    MetricSums,
    average_error,
    delta_m,
    evaluate,
    finalize,
    load_baseline,
    metric_scalars,
    summary_metrics,
)
from dist_mtl.models import MultiTaskModel

# Binary tasks on both sides of a 10-way one: the binary ones are summed as one non-contiguous block.
TASKS = [TaskSpec("smiling", 2), TaskSpec("digit", 10), TaskSpec("male", 2)]


def _batch(n: int, seed: int, missing: float = 0.3) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, spec.num_classes, generator=gen) for spec in TASKS]
    y = torch.stack([torch.randint(0, spec.num_classes, (n,), generator=gen) for spec in TASKS], dim=1)
    y[torch.rand(n, len(TASKS), generator=gen) < missing] = -1
    return logits, y


def _by_hand(logits: list[torch.Tensor], y: torch.Tensor) -> dict[str, dict[str, float]]:
    """The same metrics in numpy, from the definitions."""
    out = {}
    for t, spec in enumerate(TASKS):
        z = logits[t].double().numpy()
        labels = y[:, t].numpy()
        keep = labels != -1
        z, labels = z[keep], labels[keep]
        log_softmax = z - z.max(1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
        pred = z.argmax(1)
        accuracy = float((pred == labels).mean())
        m = {
            "loss": float(-log_softmax[np.arange(len(labels)), labels].mean()),
            "accuracy": accuracy,
            "error": 1 - accuracy,
            "labelled": int(keep.sum()),
        }
        if spec.num_classes == 2:
            tp = np.sum((pred == 1) & (labels == 1))
            fp = np.sum((pred == 1) & (labels == 0))
            fn = np.sum((pred == 0) & (labels == 1))
            m["f1"] = 2 * tp / (2 * tp + fp + fn)
        out[spec.name] = m
    return out


def _assert_close(got: dict[str, dict[str, float]], want: dict[str, dict[str, float]]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, value in want[name].items():
            assert got[name][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)


def test_metrics_match_a_numpy_computation_with_missing_labels() -> None:
    sums = MetricSums(len(TASKS))
    batches = [_batch(50, seed) for seed in range(3)]
    for logits, y in batches:
        sums.add(logits, y)
    all_logits = [torch.cat([b[0][t] for b in batches]) for t in range(len(TASKS))]
    all_y = torch.cat([b[1] for b in batches])
    assert (all_y == -1).any() and (all_y != -1).any()
    _assert_close(finalize(sums, TASKS), _by_hand(all_logits, all_y))
    assert "f1" not in finalize(sums, TASKS)["digit"]  # only binary tasks have an F1


def test_unlabelled_rows_change_nothing() -> None:
    logits, y = _batch(64, 7)
    base = MetricSums(len(TASKS))
    base.add(logits, y)
    scrambled = [out.clone() for out in logits]
    for t, out in enumerate(scrambled):
        out[y[:, t] == -1] = torch.randn_like(out[y[:, t] == -1]) * 100  # wild logits where unlabelled
    other = MetricSums(len(TASKS))
    other.add(scrambled, y)
    torch.testing.assert_close(other.tensor, base.tensor)


def test_a_batch_without_labels_adds_nothing_and_a_task_without_labels_reports_only_its_count() -> None:
    logits, y = _batch(32, 1)
    sums = MetricSums(len(TASKS))
    sums.add(logits, torch.full_like(y, -1))
    assert torch.count_nonzero(sums.tensor) == 0 and torch.isfinite(sums.tensor).all()
    y[:, 0] = -1
    sums.add(logits, y)
    metrics = finalize(sums, TASKS)
    assert metrics["smiling"] == {"labelled": 0}
    assert metrics["digit"]["labelled"] == int((y[:, 1] != -1).sum())
    json.dumps(metrics, allow_nan=False)  # no NaN anywhere
    # The average skips the unlabelled task.
    assert average_error(metrics) == pytest.approx((metrics["digit"]["error"] + metrics["male"]["error"]) / 2)


def test_sums_of_two_parts_equal_the_sums_of_the_whole() -> None:
    logits, y = _batch(101, 3)
    whole = MetricSums(len(TASKS))
    whole.add(logits, y)
    halves = [MetricSums(len(TASKS)) for _ in range(2)]
    halves[0].add([out[:40] for out in logits], y[:40])
    halves[1].add([out[40:] for out in logits], y[40:])
    reduced = halves[0].tensor.clone()
    reduced += halves[1].tensor  # what an all-reduce (sum) does
    torch.testing.assert_close(reduced, whole.tensor)
    _assert_close(finalize(reduced, TASKS), finalize(whole, TASKS))


def test_f1_of_a_known_confusion_and_zero_over_zero() -> None:
    tasks = [TaskSpec("b", 2)]
    # predictions 1,1,1,0,0,0 ; labels 1,1,0,1,0,-1 -> tp 2, fp 1, fn 1: F1 = 4/6.
    pred = torch.tensor([1, 1, 1, 0, 0, 0])
    logits = [torch.nn.functional.one_hot(pred, 2).float()]
    sums = MetricSums(1)
    sums.add(logits, torch.tensor([[1], [1], [0], [1], [0], [-1]]))
    metrics = finalize(sums, tasks)["b"]
    assert metrics["f1"] == pytest.approx(4 / 6)
    assert metrics["accuracy"] == pytest.approx(3 / 5) and metrics["labelled"] == 5
    # No positive label and no positive prediction: 0/0, defined as 0.0 (not NaN).
    none = MetricSums(1)
    none.add(
        [torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 2).float()], torch.zeros(4, 1).long()
    )
    assert finalize(none, tasks)["b"]["f1"] == 0.0


def test_add_never_asks_the_host_for_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything stays a tensor: any read of a value on the host (item, bool, float, ...) raises."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("host synchronisation in MetricSums.add")

    logits, y = _batch(16, 2)
    sums = MetricSums(len(TASKS))
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    sums.add(logits, y)
    monkeypatch.undo()
    assert sums.tensor[2].sum() > 0


@pytest.mark.gpu
def test_add_and_evaluate_do_not_synchronise_on_cuda() -> None:
    logits, y = _batch(64, 4)
    sums = MetricSums(len(TASKS), "cuda")
    logits, y = [out.cuda() for out in logits], y.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums.add(logits, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close(finalize(sums, TASKS), _by_hand([o.cpu() for o in logits], y.cpu()))


class _Recorder(nn.Module):
    """Encoder that remembers whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.linear(x)


def _model() -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(_Recorder(), [nn.Linear(6, spec.num_classes) for spec in TASKS])


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=gen)
    y = torch.stack([torch.randint(-1, spec.num_classes, (n,), generator=gen) for spec in TASKS], dim=1)
    return x, y


def test_evaluate_runs_in_eval_mode_restores_the_mode_and_all_reduces_the_sums() -> None:
    model = _model()
    model.train()
    x, y = _data(30)
    seen: list[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor) -> None:
        seen.append(tensor)
        tensor *= 2  # as if a second rank had the same share: every sum doubles, every mean stays

    metrics = evaluate(model, [(x[:16], y[:16]), (x[16:], y[16:])], "cpu", TASKS, all_reduce=all_reduce)
    assert model.encoder.modes == [False, False] and model.training
    assert len(seen) == 1 and seen[0].shape == (6, len(TASKS))
    with torch.no_grad():
        want = _by_hand(model(x), y)
    for spec in TASKS:
        want[spec.name]["labelled"] *= 2
    _assert_close(metrics, want)


def test_evaluate_restores_the_mode_when_the_model_fails() -> None:
    model = _model()
    model.train()
    with pytest.raises(RuntimeError):
        evaluate(model, [(torch.zeros(2, 5), torch.zeros(2, 3).long())], "cpu", TASKS)  # wrong width
    assert model.training


def test_evaluation_parts_of_an_in_memory_split_sum_to_the_whole() -> None:
    """MemorySource.eval_batches: parts (i, 3) cover the split once; their sums add up to the whole."""
    data = MultiTaskDataset(*_data(23), tasks=tuple(TASKS))
    source = MemorySource(data, data)

    def batches(part: tuple[int, int], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (b.x, b.y) for b in source.eval_batches(batch_size=size, part=part, device=torch.device("cpu"))
        ]

    xs = torch.cat([x for i in range(3) for x, _ in batches((i, 3), 5)])
    torch.testing.assert_close(xs, data.x)
    model = _model()
    whole = evaluate(model, batches((0, 1), 4), "cpu", TASKS)
    totals = torch.zeros(6, len(TASKS), dtype=torch.float64)
    for i in range(3):
        part = MetricSums(len(TASKS))
        with torch.no_grad():
            for x, y in batches((i, 3), 4):
                part.add(model(x), y)
        totals = totals + part.tensor
    _assert_close(finalize(totals, TASKS), whole)


# --- Delta-m and the cross-task numbers ---------------------------------------------------------------


def _metrics(**errors: float) -> dict[str, dict[str, float]]:
    return {name: {"error": e, "accuracy": 1 - e, "labelled": 10} for name, e in errors.items()}


def test_delta_m_value_and_sign() -> None:
    baseline = {"a": 0.2, "b": 0.1}
    # a: 0.1 vs 0.2 -> -50 %; b: 0.15 vs 0.1 -> +50 %; mean 0.
    assert delta_m(_metrics(a=0.1, b=0.15), baseline) == pytest.approx(0.0)
    assert delta_m(_metrics(a=0.1, b=0.1), baseline) == pytest.approx(-25.0)  # better than single-task
    assert delta_m(_metrics(a=0.3, b=0.1), baseline) == pytest.approx(25.0)  # worse: positive
    # A task without labels is left out of the mean but must still have a baseline.
    metrics = {**_metrics(a=0.1), "b": {"labelled": 0}}
    assert delta_m(metrics, baseline) == pytest.approx(-50.0)


def test_delta_m_names_a_task_without_a_baseline() -> None:
    with pytest.raises(ConfigError, match="task 'c' has no baseline error"):
        delta_m(_metrics(a=0.1, c=0.2), {"a": 0.2})
    with pytest.raises(ConfigError, match="task 'a'.*must be > 0"):
        delta_m(_metrics(a=0.1), {"a": 0.0})


def test_summary_metrics_and_scalars() -> None:
    metrics = _metrics(a=0.1, b=0.3)
    assert summary_metrics(metrics) == {"average_error": pytest.approx(0.2)}
    both = summary_metrics(metrics, {"a": 0.2, "b": 0.3})
    assert both == {"average_error": pytest.approx(0.2), "delta_m": pytest.approx(-25.0)}
    assert summary_metrics({"a": {"labelled": 0}}) == {}
    with pytest.raises(ValueError, match="no task has labelled samples"):
        average_error({"a": {"labelled": 0}})
    flat = metric_scalars(metrics, both)
    assert flat["test/error/a"] == pytest.approx(0.1) and flat["test/delta_m"] == pytest.approx(-25.0)
    # Older summaries have only an accuracy: the error is 1 - accuracy.
    assert average_error({"a": {"accuracy": 0.75}}) == pytest.approx(0.25)


# --- baseline files -----------------------------------------------------------------------------------


def _write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_baseline_reads_summaries_and_plain_maps(tmp_path: Path) -> None:
    summary = {
        "tasks": {"a": {"loss": 0.3, "accuracy": 0.9, "error": 0.1}, "b": {"accuracy": 0.8}},
        "steps": 5,
    }
    assert load_baseline(_write(tmp_path / "s.json", summary), ["a", "b"]) == pytest.approx(
        {"a": 0.1, "b": 0.2}
    )
    assert load_baseline(_write(tmp_path / "p.json", {"a": 0.25, "b": {"error": 0.5}})) == {
        "a": 0.25,
        "b": 0.5,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ([0.1, 0.2], "expected a JSON object"),
        ({"Smiling": "low"}, "task 'Smiling': 'low' is not a number"),
        ({"Smiling": True}, "task 'Smiling': True is not a number"),
        ({"Smiling": 0.0}, r"task 'Smiling': error 0.0 must be in \(0, 1\]"),
        ({"Smiling": -0.1}, r"task 'Smiling': error -0.1 must be in \(0, 1\]"),
        ({"Smiling": 8.5}, "task 'Smiling'.*a percentage"),
        ({"Smiling": {"accuracy": 1.0}}, "task 'Smiling': error 0.0"),
        ({"Smiling": {"loss": 0.1}}, "task 'Smiling': expected an 'error' or 'accuracy' key"),
        ({"tasks": {"Smiling": {"labelled": 0}}}, "task 'Smiling': the baseline run had no labelled samples"),
        ({"Male": 0.1}, "task 'Smiling': missing"),
    ],
)
def test_load_baseline_errors_name_the_file_and_the_task(
    tmp_path: Path, content: object, message: str
) -> None:
    path = _write(tmp_path / "baseline.json", content)
    with pytest.raises(ConfigError, match=f"^eval.baseline: {re.escape(str(path))}: .*{message}"):
        load_baseline(path, ["Smiling"])


def test_load_baseline_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"eval.baseline: {tmp_path / 'nope.json'}: no such file")
    ):
        load_baseline(tmp_path / "nope.json")


def test_nan_in_a_baseline_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.json", '{"a": NaN}')
    with pytest.raises(ConfigError, match=r"task 'a': error nan must be in \(0, 1\]"):
        load_baseline(path)
