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
