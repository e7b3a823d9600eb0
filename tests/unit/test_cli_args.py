"""`dist-mtl train` and `python -m dist_mtl.train`: argument order, flags passed on, help text."""

from __future__ import annotations

import pytest

from dist_mtl import cli
from dist_mtl import train as train_module


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "configs/x.yaml", "--nproc", "2", "optim.lr=0.1", "--resume"],
        ["train", "configs/x.yaml", "optim.lr=0.1", "--resume", "--nproc", "2"],
        ["train", "--resume", "configs/x.yaml", "--nproc=2", "optim.lr=0.1"],
    ],
)
def test_train_options_and_overrides_mix_in_any_order(argv: list[str]) -> None:
    ns = cli.parse_args(argv)
    assert ns.args == ["configs/x.yaml", "optim.lr=0.1"]
    assert (ns.nproc, ns.resume, ns.overwrite, ns.command) == (2, True, False, "train")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_nproc_below_one_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["train", "--nproc", value])
    assert exit_.value.code == 2
    assert "argument --nproc: must be an integer >= 1" in capsys.readouterr().err


def test_the_rank_entry_takes_overwrite_anywhere() -> None:
    ns = train_module.build_parser().parse_intermixed_args(
        ["c.yaml", "--overwrite", "optim.lr=1", "--resume"]
    )
    assert ns.args == ["c.yaml", "optim.lr=1"] and ns.overwrite and ns.resume


def test_other_commands_still_parse() -> None:
    assert cli.parse_args(["profile", "runs/x"]).run_dir == "runs/x"
    assert cli.parse_args(["data", "celeba", "a", "b"]).out == "b"


def test_torchrun_command_passes_resume_overwrite_and_a_private_log_dir() -> None:
    cmd = cli.torchrun_command(2, ["c.yaml", "a.b=1"], resume=True, overwrite=True, log_dir="/x/logs")
    assert cmd[cmd.index("-m", 3) :] == ["-m", "dist_mtl.train", "c.yaml", "a.b=1", "--resume", "--overwrite"]
    assert "--log-dir=/x/logs" in cmd and "--nproc_per_node=2" in cmd


def test_overwrite_reaches_the_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    seen: dict[str, object] = {}

    def fake_run(cfg, *, resume: bool = False, overwrite: bool = False) -> int:
        seen.update(resume=resume, overwrite=overwrite)
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    assert cli.main(["train", f"run_dir={tmp_path}", "--overwrite"]) == 0
    assert seen == {"resume": False, "overwrite": True}


def test_train_help_says_where_keys_are_documented_and_what_the_default_is() -> None:
    _, train = cli.build_parsers()
    text = train.format_help()
    assert 'README.md, section "Configuration"' in text and "dist_mtl/config.py" in text
    assert "configs/multidigits_mgda.yaml" in text and "--overwrite" in text


def test_celeba_shard_size_defaults_to_the_converter_s() -> None:
    from dist_mtl.data.celeba_convert import DEFAULT_SHARD_SIZE

    assert cli.parse_args(["data", "celeba", "a", "b"]).shard_size == DEFAULT_SHARD_SIZE


def test_without_a_rank_line_the_root_cause_rank_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """A rank killed before it could print: torchrun's root cause, not its first listed failure."""
    relay = cli._Relay.__new__(cli._Relay)
    relay.errors, relay.tail = (
        [],
        (
            "Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 1)\n"
            "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n"
            "  exitcode  : 17 (pid: 2)\n"
        ),
    )
    cli._report_failure(relay)
    assert capsys.readouterr().err.startswith("dist-mtl: error: rank 1 exited with code 17")


@pytest.mark.parametrize("value", ["-1", "one"])
def test_max_restarts_below_zero_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["train", "--max-restarts", value])
    assert exit_.value.code == 2
    assert "argument --max-restarts: must be an integer >= 0" in capsys.readouterr().err


def test_max_restarts_reaches_torchrun() -> None:
    ns = cli.parse_args(["train", "c.yaml", "--max-restarts", "2", "--nproc", "2"])
    assert (ns.max_restarts, ns.nproc, ns.nnodes, ns.rdzv_endpoint) == (2, 2, 1, None)
    assert cli.parse_args(["train"]).max_restarts == 0
    cmd = cli.torchrun_command(2, ["c.yaml"], resume=False, overwrite=False, log_dir="/x", max_restarts=2)
    assert "--max-restarts=2" in cmd and "--standalone" in cmd


def _record_torchrun(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    seen: dict[str, object] = {}

    def fake_torchrun(nproc: int, args, **options) -> int:
        seen.update(nproc=nproc, args=list(args), **options)
        return 0

    monkeypatch.setattr(cli, "run_torchrun", fake_torchrun)
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("ran in-process instead of under torchrun"))
    return seen


def test_one_rank_with_restarts_runs_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A single-process run that should survive a crash: one rank under torchrun (WORLD_SIZE 1)."""
    seen = _record_torchrun(monkeypatch)
    assert cli.main(["train", f"run_dir={tmp_path}", "--max-restarts", "1"]) == 0
    assert (seen["nproc"], seen["max_restarts"], seen["rendezvous"]) == (1, 1, None)


def test_nnodes_passes_a_c10d_rendezvous_and_checks_the_layout_of_every_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _record_torchrun(monkeypatch)
    argv = [
        "train",
        f"run_dir={tmp_path}",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        "node0:29400",
        "--rdzv-id",
        "j7",
    ]
    assert cli.main(argv) == 0  # 2 nodes x 1 rank: the default 1 x 2 layout of T = 2 tasks
    rendezvous = seen["rendezvous"]
    assert rendezvous == cli.Rendezvous(2, "node0:29400", "j7")
    cmd = cli.torchrun_command(1, [], resume=False, overwrite=False, log_dir="/x", rendezvous=rendezvous)
    assert "--standalone" not in cmd
    assert cmd[3:7] == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=j7"]
    # W = 2 nodes x 2 ranks = 4 > T = 2: refused before torchrun starts, as with --nproc 4.
    assert cli.main([*argv, "--nproc", "2"]) == 2
    assert "engine.task_parallel K=4 exceeds the number of tasks T=2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nnodes", "2"], "dist-mtl: error: --nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--rdzv-id", "x"], "dist-mtl: error: --rdzv-id needs --rdzv-endpoint HOST:PORT"),
    ],
)
def test_multi_node_options_without_an_endpoint_are_one_line_errors(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    _record_torchrun(monkeypatch)
    assert cli.main(["train", f"run_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("value", ["node0", "node0:", ":29400", "node0:0", "node0:70000"])
def test_a_bad_rendezvous_endpoint_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--rdzv-endpoint", value])
    assert "argument --rdzv-endpoint: must be HOST:PORT" in capsys.readouterr().err


def test_a_restarted_attempt_is_noted_and_its_error_lines_are_forgotten() -> None:
    """torchrun's line for a failed attempt it restarts: one notice; a later failure reports only the
    last attempt's lines; the attempt that exhausts the restarts gets no notice."""
    import io

    sink = io.BytesIO()
    relay = cli._Relay(io.BytesIO(), sink, max_restarts=1)
    failed = (
        b"E1203 21:31:40.443000 4839 torch/distributed/elastic/multiprocessing/api.py:1002] "
        b"failed (exitcode: 17) local_rank: 1 (pid: 4845) of binary: /usr/bin/python\n"
    )
    relay._scan(b"dist_mtl.train: rank 0: error: first attempt\n" + failed)
    assert relay.errors == [] and relay.restarts == 1
    notice = sink.getvalue().decode()
    assert notice == (
        "dist-mtl: local rank 1 failed (exit code 17); torchrun restarts every rank (restart 1 of 1), "
        "resuming from the last checkpoint\n"
    )
    relay._scan(b"dist_mtl.train: rank 0: error: second attempt\n" + failed)
    assert relay.errors == ["dist_mtl.train: rank 0: error: second attempt"]
    assert sink.getvalue().decode() == notice and relay.restarts == 1
