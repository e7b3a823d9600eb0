"""Config loading: YAML + dotted overrides, and errors that name the field and what is valid."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import dist_mtl.engine
from dist_mtl import config as config_module
from dist_mtl.balancers import BALANCER_NAMES
from dist_mtl.build import build_datasets
from dist_mtl.config import ConfigError, config_to_dict, load_config, parse_overrides
from dist_mtl.data import DATASET_NAMES, build_dataset
from dist_mtl.data.synthetic import build_synthetic
from dist_mtl.models import ENCODER_NAMES, NORM_NAMES, NORMED_ENCODERS

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
def test_shipped_configs_load(path: Path, tmp_path: Path) -> None:
    # The CelebA recipes point at data/celeba64, which a user converts first (configs say how).
    load_config(path, [f"data.path={tmp_path}"] if path.name.startswith("celeba40_") else [])


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("optim: {lr: 0.5, name: sgd}\nmodel: {encoder: mlp, hidden: [8, 4]}\n")
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
        (["engine.protocol=ring"], "engine.protocol must be one of auto, gather, gramian, sketch, rep"),
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


def test_choices_come_from_the_registries() -> None:
    choices = config_module._CHOICES
    assert choices["balancer.name"] == BALANCER_NAMES
    assert choices["data.name"] == DATASET_NAMES
    assert choices["model.encoder"] == ENCODER_NAMES
    assert choices["model.norm"] == NORM_NAMES
    assert {e for e, fields in config_module.ENCODER_OPTIONS.items() if "norm" in fields} == set(
        NORMED_ENCODERS
    )
    assert set(config_module.ENCODER_OPTIONS) == set(ENCODER_NAMES)


def test_protocol_names_are_the_engines() -> None:
    """config cannot import the engine, so its copy of the protocol names is checked here."""
    assert set(config_module.PROTOCOL_NAMES) == set(dist_mtl.engine.PROTOCOL_NAMES)
    assert config_module._CHOICES["engine.protocol"] == ("auto", *config_module.PROTOCOL_NAMES)


@pytest.mark.parametrize(("mode", "resolved"), [("exact", "gramian"), ("rep", "rep")])
def test_protocol_auto_resolves_at_load_and_is_what_gets_recorded(mode: str, resolved: str) -> None:
    cfg = load_config(None, [f"train.mode={mode}"])
    assert cfg.engine.protocol == resolved and dist_mtl.engine.PROTOCOL_MODE[resolved] == mode
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))["engine"]["protocol"] == resolved
    assert load_config(None, [f"train.mode={mode}", "engine.protocol=gather"]).engine.protocol == "gather"


def test_mgda_ub_config_needs_no_protocol() -> None:
    path = Path(__file__).parents[2] / "configs" / "multidigits_mgda_ub.yaml"
    assert load_config(path).engine.protocol == "rep"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["balancer.name=getmtl", "balancer.normalization=l2"],
            "balancer.normalization is not used by balancer 'getmtl' "
            "(it takes: eps, tol, max_iter, max_scale)",
        ),
        (["balancer.name=uniform", "balancer.seed=3"], "balancer.seed is not used by balancer 'uniform'"),
        (["balancer.eps=0.5"], "balancer.eps is not used by balancer 'mgda' (it takes: normalization, apply"),
        (["balancer.max_scale=5"], "balancer.max_scale is not used by balancer 'mgda'"),
        (
            ["data.image_size=32"],
            "data.image_size is not used by data set 'multidigits' (it takes: train_size",
        ),
        (["data.name=synthetic", "data.tasks=binary"], "data.tasks is not used by data set 'synthetic'"),
        (["data.num_clusters=2"], "data.num_clusters is not used by data set 'multidigits'"),
        (["model.hidden=[8]"], "model.hidden is not used by encoder 'lenet' (it takes: rep_dim)"),
        (["model.norm=group"], "model.norm is not used by encoder 'lenet' (it takes: rep_dim)"),
        (["model.encoder=mlp", "model.norm=group"], "model.norm is not used by encoder 'mlp'"),
        (["model.encoder=resnet18", "model.rep_dim=8"], "model.rep_dim is not used by encoder 'resnet18'"),
        (
            ["optim.momentum=0.5"],
            "optim.momentum is not used by optimizer 'adam' "
            "(it takes: lr, weight_decay, lr_decay, decay_every)",
        ),
        (["engine.compression=fp16"], "engine.compression 'fp16' applies only with engine.protocol gather"),
        (
            ["engine.protocol=gather", "engine.topk_ratio=0.5"],
            "engine.topk_ratio 0.5 applies only with engine.protocol gather and engine.compression topk; "
            "it is not used by engine.protocol 'gather' with engine.compression 'none'",
        ),
        (["engine.sketch_size=64"], "engine.sketch_size 64 applies only with engine.protocol sketch"),
        (["engine.sketch_seed=1"], "engine.sketch_seed 1 applies only with engine.protocol sketch"),
    ],
)
def test_options_the_chosen_component_does_not_use_are_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["balancer.name=getmtl", "balancer.eps=0.5"],
        ["balancer.name=mamg", "balancer.seed=3"],
        ["optim.name=sgd", "optim.momentum=0.5"],
        ["model.encoder=mlp", "model.hidden=[8]"],
        ["model.encoder=resnet18", "model.norm=group", "model.width=8"],
        ["engine.protocol=gather", "engine.compression=topk", "engine.topk_ratio=0.5"],
        ["engine.protocol=gather", "engine.compression=countsketch", "engine.sketch_size=64"],
        ["engine.protocol=sketch", "engine.sketch_seed=3"],
        ["data.name=synthetic", "data.num_clusters=2", "data.conflict=0.5"],
        ["balancer.normalization=none"],  # an unused-looking field at its default is fine
    ],
)
def test_options_the_chosen_component_uses_are_accepted(overrides: list[str]) -> None:
    load_config(None, overrides)


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=inf",
        "optim.lr=.inf",
        "engine.timeout_s=inf",
        "optim.weight_decay=nan",
        "balancer.eps=nan",
        "balancer.tol=-inf",
        "data.conflict=nan",
        "train.max_skipped_fraction=nan",
    ],
)
def test_float_fields_must_be_finite(override: str) -> None:
    extra = ["data.name=synthetic"] if override.startswith("data.") else []
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]} must be a finite number; got"):
        load_config(None, [*extra, override])


@pytest.mark.parametrize("field", ["train_size", "test_size"])
def test_empty_splits_are_errors(field: str) -> None:
    with pytest.raises(ConfigError, match=f"data.{field} must be > 0; got 0"):
        load_config(None, [f"data.{field}=0"])


@pytest.mark.parametrize("name", ["multidigits", "synthetic"])
def test_batch_larger_than_the_training_split_fails_at_load(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.name={name}", "data.train_size=100", "data.batch_size=128"])
    assert str(err.value) == (
        f"data.batch_size 128 is larger than the training split of {name!r} (100 samples, "
        "data.train_size); use data.batch_size <= 100"
    )


def test_synthetic_fields_default_to_the_builders_defaults() -> None:
    defaults = inspect.signature(build_synthetic).parameters
    cfg = load_config(None, ["data.name=synthetic"])
    assert cfg.data.num_clusters == defaults["num_clusters"].default
    assert cfg.data.conflict == defaults["conflict"].default


def test_build_datasets_passes_every_option_the_builder_takes() -> None:
    small = ["data.name=synthetic", "data.num_tasks=4", "data.input_dim=8", "data.train_size=32"]
    cfg = load_config(
        None, [*small, "data.test_size=16", "data.batch_size=8", "data.num_clusters=2", "data.conflict=0.3"]
    )
    train, test = build_datasets(cfg)
    expected, _ = build_dataset(
        "synthetic",
        seed=0,
        num_tasks=4,
        input_dim=8,
        train_size=32,
        test_size=16,
        num_clusters=2,
        conflict=0.3,
    )
    assert torch.equal(train.x, expected.x) and torch.equal(train.y, expected.y) and len(test) == 16


def test_max_scale_defaults_to_getmtl_s_and_reaches_the_balancer() -> None:
    from dist_mtl.balancers.getmtl import DEFAULT_MAX_SCALE
    from dist_mtl.build import build_balancer_for

    assert load_config().balancer.max_scale == DEFAULT_MAX_SCALE
    cfg = load_config(None, ["balancer.name=getmtl", "balancer.max_scale=4"])
    assert build_balancer_for(cfg).max_scale == 4.0
    with pytest.raises(ConfigError, match="balancer.max_scale must be > 1; got 1.0"):
        load_config(None, ["balancer.name=getmtl", "balancer.max_scale=1"])


def test_shard_optimizer_with_an_optimizer_that_is_not_elementwise_fails_at_load(monkeypatch) -> None:
    """engine.shard_optimizer steps each rank's slice alone: an optimizer whose update of a coordinate
    reads more than that coordinate (here SGD, declared not elementwise) is refused, naming the field;
    sharding off, or a protocol that does not shard, loads."""
    monkeypatch.setattr(config_module, "ELEMENTWISE_OPTIMIZERS", frozenset({"adam"}))
    with pytest.raises(ConfigError, match=r"engine\.shard_optimizer.*optim\.name 'sgd'"):
        load_config(None, ["optim.name=sgd"])
    load_config(None, ["optim.name=sgd", "engine.shard_optimizer=false"])
    load_config(None, ["optim.name=sgd", "engine.protocol=gather"])
    load_config(None, ["optim.name=adam"])
