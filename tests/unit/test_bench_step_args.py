"""bench/step.py: its options, the rows its --json writes, and every table printing from those rows."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

STEP_PY = Path(__file__).resolve().parents[2] / "bench" / "step.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # the module pins OMP/BLAS threads to 1 in os.environ when imported: keep this process's environment
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("bench_step", STEP_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def test_defaults_and_overrides(bench: ModuleType) -> None:
    ns = bench.parse_args([])
    assert (ns.quick, ns.json, ns.single_process_only, ns.device) == (False, None, False, "cpu")
    assert ns.tasks == [2, 4, 8] and ns.models == ["cnn", "mlp"]
    assert bench.step_counts(ns) == bench.STEPS
    quick = bench.parse_args(["--quick", "--json", "out.json"])
    assert quick.json == "out.json" and bench.step_counts(quick) == bench.QUICK_STEPS
    ns = bench.parse_args(
        ["--single-process-only", "--device", "cuda", "--tasks", "4", "8", "4", "--steps", "30"]
    )
    assert ns.tasks == [4, 8] and ns.device == "cuda"
    counts = bench.step_counts(ns)
    assert counts["main"]["cnn"] == (30, 2) and counts["k_equals_t"]["mlp"] == (30, 5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "needs --single-process-only"),
        (["--device", "nonsense"], "--device"),
        (["--single-process-only", "--device", "meta"], "cpu or cuda"),
        (["--tasks", "1"], "must be >= 2"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--models", "resnet"], "invalid choice"),
    ],
)
def test_bad_options_are_usage_errors(
    bench: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _series(bench: ModuleType, steps: int = 3, written: float = 1000.0) -> dict[str, list[float]]:
    out = {f"time/{p}": [0.001 * (i + 1) for i in range(steps)] for p in bench.PHASES}
    out["time/step"] = [0.01 * (i + 1) for i in range(steps)]
    out["bytes_sent/total"] = [written] * steps
    out["bytes_recv/total"] = [written] * steps
    out["written"] = [written] * steps
    out["optimizer_state_bytes"] = [4096.0] * steps
    return out


def test_rows_and_tables_from_synthetic_measurements(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    single = {f"main/cnn/2/{k}": _series(bench) for k in bench.KINDS}
    single["k_equals_t/cnn/2/uniform"] = _series(bench)
    keys = ["k_equals_t/cnn/2/gramian", *(f"main/cnn/2/{p}" for p in (*bench.PROTOCOLS, "rep"))]
    ranks = [{key: _series(bench) for key in keys} for _ in range(bench.WORLD)]
    rows = bench.build_rows(single, ranks, ["cnn"], [2], "cpu")
    assert len(rows) == 3 + 4 + 2
    json.dumps(rows)  # plain JSON
    gramian = bench.find(rows, "main", "cnn", 2, "2r gramian")
    assert gramian["layout"] == "1x2" and gramian["protocol"] == "gramian"
    assert set(gramian["ratios"]) == {"over_1p_uniform", "over_1p_exact"}
    assert {"ideal_ms", "step_over_ideal", "overhead", "exchange_solve_apply_share"} <= set(gramian)
    rank = gramian["ranks"][0]
    assert set(rank["bytes"]) == {
        "sent_measured",
        "sent_accounted",
        "sent_analytic",
        "recv_measured",
        "recv_accounted",
        "recv_analytic",
        "measured_over_analytic",
    }
    assert rank["optimizer_state_bytes"] == 4096 and set(rank["phase_ms"]) == set(bench.PHASES)
    assert "ideal_ms" not in bench.find(rows, "main", "cnn", 2, "2r rep")
    kt = bench.find(rows, "k_equals_t", "cnn", 2, "2r gramian")
    assert (
        kt["target"] == 1.15
        and kt["ratios"]["k_equals_t_over_1p_uniform"] == pytest.approx(1.0)
        and "ideal_over_1p_uniform" in kt["ratios"]
    )
    bench.print_tables(rows, "cnn", [2])
    bench.print_k_equals_t(rows, ["cnn"])
    bench.print_single_only(rows, ["cnn"], [2], "cpu")
    out = capsys.readouterr().out
    assert "Optimizer-state bytes per rank" in out and "| cnn | 2 | 3 |" in out


def test_single_process_run_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    path = tmp_path / "step.json"
    argv = ["--single-process-only", "--models", "cnn", "--tasks", "2", "--steps", "1", "--warmup", "0"]
    try:
        bench.main([*argv, "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(path.read_text())
    assert report["schema"] == bench.JSON_SCHEMA
    assert report["meta"]["single_process_only"] and report["meta"]["device"] == "cpu"
    assert {"commit", "dirty", "date", "torch", "steps", "seconds"} <= set(report["meta"])
    runs = {row["run"]: row for row in report["rows"]}
    assert set(runs) == {"1p uniform", "1p exact", "1p rep"}
    for row in runs.values():
        assert row["steps"] == 1 and row["step_ms"] > 0 and set(row["phase_ms"]) == set(bench.PHASES)
        # SGD momentum: one float32 buffer per parameter (shared and heads) after a step
        assert row["optimizer_state_bytes"] == 4 * sum(
            p.numel() for p in bench.build_model("cnn", 2).parameters()
        )
