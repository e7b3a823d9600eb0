"""Encoders and `model.norm`: which layers each choice builds, what it refuses, what stays the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_mtl.models import NORM_NAMES, SyncBatchNorm2d, build_model, group_count

SHAPE = (1, 8, 16)


def _resnet(norm: str):
    torch.manual_seed(0)
    return build_model("resnet18", SHAPE, [10, 10], width=4, norm=norm)


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)]


def test_each_norm_builds_its_layers_in_every_position() -> None:
    kinds = {"batch": nn.BatchNorm2d, "sync": SyncBatchNorm2d, "group": nn.GroupNorm}
    for norm, cls in kinds.items():
        layers = _norm_layers(_resnet(norm))
        assert len(layers) == 20  # stem, 2 per basic block, 3 projection shortcuts
        assert all(type(m) is cls for m in layers), norm


def test_batch_is_todays_batchnorm_and_sync_keeps_its_checkpoint_format() -> None:
    batch, sync = _resnet("batch"), _resnet("sync")
    assert not any(isinstance(m, SyncBatchNorm2d) for m in batch.modules())
    a, b = batch.state_dict(), sync.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_initial_parameters_do_not_depend_on_norm() -> None:
    params = {norm: list(_resnet(norm).parameters()) for norm in NORM_NAMES}
    for norm in ("sync", "group"):
        assert all(torch.equal(p, q) for p, q in zip(params["batch"], params[norm], strict=True))


def test_group_norm_uses_the_largest_divisor_up_to_32_with_two_channels_per_group() -> None:
    channels = (1, 2, 4, 10, 20, 32, 48, 64, 96, 512)
    assert [group_count(c) for c in channels] == [1, 1, 2, 5, 10, 16, 24, 32, 32, 32]
    for m in _norm_layers(_resnet("group")):
        assert m.num_groups == group_count(m.num_channels)


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_every_norm_runs_forward_and_backward(norm: str) -> None:
    model = _resnet(norm)
    out = model(torch.randn(4, *SHAPE))
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in model.shared_parameters())


@pytest.mark.parametrize("encoder", ["mlp", "lenet"])
def test_encoders_without_norm_layers_refuse_a_norm(encoder: str) -> None:
    assert build_model(encoder, SHAPE, [10], norm="batch") is not None  # the default changes nothing
    for norm in ("sync", "group"):
        with pytest.raises(ValueError, match="model.norm"):
            build_model(encoder, SHAPE, [10], norm=norm)


def test_unknown_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="batch, sync, group"):
        build_model("resnet18", SHAPE, [10], width=4, norm="layer")
