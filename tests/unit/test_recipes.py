"""The CelebA-40 recipes in configs/: they load, and the MGDA one is the official code's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_mtl.config import load_config
from dist_mtl.errors import ConfigError
from dist_mtl.trainer import learning_rate

CONFIGS = Path(__file__).parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("celeba40_*.yaml"))


def test_the_recipe_set_is_complete() -> None:
    names = {p.stem for p in RECIPES}
    assert names == {
        "celeba40_mgda_ub",
        "celeba40_mgda_k8",
        "celeba40_mgda_k40",
        "celeba40_getmtl",
        "celeba40_mamg",
        "celeba40_uniform",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_shares_the_mgda_data_model_and_optimizer(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, [f"data.path={tmp_path}"])
    assert (cfg.data.name, cfg.data.image_size, cfg.data.batch_size) == ("celeba", 64, 256)
    assert (cfg.model.encoder, cfg.model.width) == ("resnet18", 64)
    o = cfg.optim
    assert (o.name, o.lr, o.lr_decay, o.decay_every) == ("adam", 5e-4, 0.85, 10)


def test_mgda_ub_recipe_is_the_official_one(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "celeba40_mgda_ub.yaml", [f"data.path={tmp_path}"])
    assert cfg.train.mode == "rep" and cfg.engine.protocol == "rep"
    assert (cfg.balancer.name, cfg.balancer.normalization) == ("mgda", "loss+")
    k8 = load_config(CONFIGS / "celeba40_mgda_k8.yaml", [f"data.path={tmp_path}"])
    k40 = load_config(CONFIGS / "celeba40_mgda_k40.yaml", [f"data.path={tmp_path}"])
    assert (k8.train.mode, k8.engine.task_parallel, k40.engine.task_parallel) == ("exact", 8, 40)


def test_learning_rate_decays_once_every_decay_every_epochs(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "celeba40_mgda_ub.yaml", [f"data.path={tmp_path}"])
    per_epoch = 7
    lrs = [learning_rate(cfg, step, per_epoch) for step in (0, 69, 70, 139, 140, 700)]
    assert lrs == pytest.approx([5e-4, 5e-4, 5e-4 * 0.85, 5e-4 * 0.85, 5e-4 * 0.85**2, 5e-4 * 0.85**10])


def test_a_decay_without_a_period_is_refused() -> None:
    with pytest.raises(ConfigError, match="optim.lr_decay 0.85 and optim.decay_every 0 must be set together"):
        load_config(None, ["optim.lr_decay=0.85"])
