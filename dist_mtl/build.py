"""From a validated config to components: device, data sets, model, balancer, optimizer.

Used by the entry points (which build the data once, before any process group exists) and by the
trainer; nothing here runs a collective.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_mtl.balancers import Balancer, balancer_options, build_balancer
from dist_mtl.config import RunConfig
from dist_mtl.data import MultiTaskDataset, build_dataset
from dist_mtl.errors import ConfigError
from dist_mtl.models import MultiTaskModel, build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def build_datasets(cfg: RunConfig) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    d = cfg.data
    options: dict[str, Any] = {}
    if d.name == "multidigits":
        options = {"tasks": d.tasks, "train_size": d.train_size, "test_size": d.test_size}
        if d.tasks == "binary" and d.num_tasks is not None:
            options["num_tasks"] = d.num_tasks
    elif d.name == "synthetic":
        options = {"train_size": d.train_size, "test_size": d.test_size, "input_dim": d.input_dim}
        if d.num_tasks is not None:
            options["num_tasks"] = d.num_tasks
    elif d.name == "celeba":
        options = {"path": d.path, "image_size": d.image_size, "max_samples": d.max_samples}
    return build_dataset(d.name, seed=cfg.seed, **options)


def build_model_for(cfg: RunConfig, train: MultiTaskDataset) -> MultiTaskModel:
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return build_model(
        m.encoder,
        train.input_shape,
        [t.num_classes for t in train.tasks],
        hidden=m.hidden,
        rep_dim=m.rep_dim,
        width=m.width,
    )


def build_balancer_for(cfg: RunConfig) -> Balancer:
    """The configured balancer, given every config field its constructor takes."""
    b = cfg.balancer
    return build_balancer(b.name, **{k: getattr(b, k) for k in balancer_options(b.name) if hasattr(b, k)})


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
