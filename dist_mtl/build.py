"""From a validated config to components: device, data sets, model, balancer, optimizer.

Used by the entry points (which build the data once, before any process group exists) and by the
trainer; nothing here runs a collective.
"""

from __future__ import annotations

import torch

from dist_mtl.balancers import Balancer, build_balancer, with_levers
from dist_mtl.config import RunConfig, balancer_kwargs
from dist_mtl.data import BatchSource, MemorySource, MultiTaskDataset, build_dataset, dataset_options
from dist_mtl.errors import ConfigError
from dist_mtl.models import MultiTaskModel, build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def build_datasets(cfg: RunConfig) -> tuple[MultiTaskDataset, MultiTaskDataset] | BatchSource:
    """The (train, test) splits, given every data field the data set's builder takes.

    A field left at None means "the data set's default" and is not passed, so the builder's own
    default applies (e.g. data.num_tasks for multidigits pair or synthetic).
    """
    d = cfg.data
    options = {k: getattr(d, k) for k in dataset_options(d.name) if getattr(d, k, None) is not None}
    return build_dataset(d.name, seed=cfg.seed, **options)


def build_source(cfg: RunConfig) -> BatchSource:
    """The configured data as the trainer's batch source: in memory for the bundled sets, streamed
    (`ShardSource`) for shard directories."""
    built = build_datasets(cfg)
    return MemorySource(*built) if isinstance(built, tuple) else built


def build_model_for(cfg: RunConfig, train: MultiTaskDataset | BatchSource) -> MultiTaskModel:
    """The configured model, seeded by cfg.seed; `build_model`'s refusals become ConfigError (exit 2)."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    try:
        return build_model(
            m.encoder,
            train.input_shape,
            [t.num_classes for t in train.tasks],
            hidden=m.hidden,
            rep_dim=m.rep_dim,
            width=m.width,
            norm=m.norm,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def build_balancer_for(cfg: RunConfig) -> Balancer:
    """The configured balancer, given every config field its constructor takes, wrapped by the levers
    balancer.task_sample and balancer.update_every when they are on (`dist_mtl.balancers.levers`)."""
    b = cfg.balancer
    inner = build_balancer(b.name, **balancer_kwargs(b))
    return with_levers(inner, update_every=b.update_every, task_sample=b.task_sample, seed=b.seed)


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
