"""Config loading: YAML + dotted overrides, and errors that name the field and what is valid."""

from pathlib import Path

import pytest

from dist_mtl.config import ConfigError, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_documented_default_run() -> None:
    cfg = load_config()
    assert (cfg.data.name, cfg.data.tasks, cfg.balancer.name, cfg.train.mode) == (
        "multidigits",
        "pair",
        "mgda",
        "exact",
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("optim: {lr: 0.5, name: sgd}\nmodel: {hidden: [8, 4]}\n")
    cfg = load_config(f, ["optim.lr=0.25", "engine.split=1,2", "train.progress=false"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.25
    assert cfg.model.hidden == [8, 4] and cfg.engine.split == [1, 2] and cfg.train.progress is False


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys here: name, lr"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["balancer.name=nope"], "balancer.name must be one of uniform, mgda, getmtl, mamg"),
        (["balancer.eps=0"], "balancer.eps must be in (0, 1]"),
        (["balancer.eps=1.5"], "balancer.eps must be in (0, 1]"),
        (["train.steps=2.5"], "train.steps must be an integer"),
        (["train.progress=maybe"], "train.progress must be true or false"),
        (["data.path=/no/such/dir"], "data.path: no such file or directory: /no/such/dir"),
        (["engine.protocol=ring"], "engine.protocol must be one of gather, gramian, sketch, rep"),
        (["engine.topk_ratio=0"], "engine.topk_ratio must be in (0, 1]"),
        (["data=3"], "data must be a mapping"),
        (["data.num_tasks=0"], "data.num_tasks must be >= 1 (an empty task list cannot be trained)"),
        (["data.batch_size=0"], "data.batch_size must be > 0"),
        (["optim.lr"], "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  encoderr: mlp\n")
    with pytest.raises(ConfigError, match="'model.encoderr'"):
        load_config(nested)


def test_parse_overrides_nests_and_parses_scalars() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}
