"""`dist-mtl launch` options: SLURM's time formats, what is refused before submission (naming the
option), and the sbatch script it generates (a golden file; tests/slurm checks that the submitted
script is this text)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_mtl.cli import main as dist_mtl_main
from dist_mtl.cluster.options import parse_time_limit


def main(args: list[str]) -> int:
    return dist_mtl_main(["launch", *args])


GOLDEN = Path(__file__).parents[1] / "golden" / "launch_2x4_gpu.sbatch"
CONFIG = str(Path(__file__).parents[2] / "configs" / "multidigits40_mamg.yaml")


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),  # minutes may exceed 59 alone
        ("1:30", 2),  # MM:SS, rounded up
        ("01:00:00", 60),
        ("0:0:30", 1),
        ("1-0", 1440),
        ("1-2:3", 1563),
        ("2-00:00:01", 2881),
    ],
)
def test_time_limits_in_every_slurm_format(text: str, minutes: int) -> None:
    assert parse_time_limit(text) == minutes


@pytest.mark.parametrize("text", ["1:2:3:4", "one hour", "0", "0:00:00", "1:60", "1:61:00", "1-24", "-5"])
def test_time_limits_slurm_would_refuse(text: str) -> None:
    with pytest.raises(ValueError, match="--time"):
        parse_time_limit(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "argument --nodes: must be an integer >= 1; got 0"),
        (["--time", "1:2:3:4"], "--time '1:2:3:4': expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH"),
        (
            ["--gpus-per-node", "2", "--tasks-per-node", "4"],
            "--tasks-per-node 4 is more than --gpus-per-node 2: each rank needs a GPU of its own",
        ),
        (["--mem", "lots"], "--mem 'lots': expected a size such as 64G"),
        (["--time", "5", "--signal-delay", "300"], "--signal-delay 300s is not shorter than --time 5"),
        (["--tasks-per-node", "3"], "engine.task_parallel"),  # 3 ranks, 2 tasks: no layout fits
        (["train.device=cuda"], "train.device=cuda but --gpus-per-node is 0"),
        (["--executor", "local", "--folder", "logs/%j"], "--folder logs/%j: the local executor does not"),
    ],
)
def test_bad_options_fail_before_anything_is_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    try:
        code = main([f"run_dir={tmp_path / 'run'}", "--dry-run", *args])
    except SystemExit as usage:  # argparse's own check of an option's type
        code = usage.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith(("dist-mtl: error: ", "usage:")), err
    assert not (tmp_path / "run").exists()


def test_the_generated_sbatch_script_is_the_golden_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """2 nodes x 4 GPUs: one task per GPU, the pre-timeout signal, requeue, every rank's log in
    RUN_DIR/submitit, submitit's loader run by srun on every task."""
    run_dir = tmp_path / "run"
    args = [CONFIG, f"run_dir={run_dir}", "--dry-run", "--nodes", "2", "--gpus-per-node", "4"]
    args += ["--cpus-per-task", "8", "--mem", "64G", "--partition", "gpu"]
    args += ["--account", "proj", "--qos", "high"]
    args += ["--time", "1-00:00:00", "--signal-delay", "300"]
    assert main(args) == 0
    script = capsys.readouterr().out.replace(str(run_dir), "RUN_DIR").replace(sys.executable, "PYTHON")
    assert script == GOLDEN.read_text()
    assert not run_dir.exists()  # a dry run writes nothing
