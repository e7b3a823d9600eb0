"""The sharded optimizer (engine.shard_optimizer) on one process, against torch's optimizer on the whole.

Adam (with L2 weight decay) and SGD-momentum update each coordinate from its own gradient and state,
so stepping slices apart must give the whole step bit for bit: on one rank (every group of one, the
parameter all-gather a copy) through `step()` with the learning rate changed between steps on the
trainer's optimizer only; and for every rank (r, k) of a 2 x 3 layout with P not divisible by K D,
each rank's slice and its state are exactly the matching elements of the whole. The checkpoint format:
`gather_state` gives the single-process optimizer's state for every shared parameter, and a
single-process state loaded (`load_full`) continues exactly like the optimizer that wrote it. The
collectives (the world gather of the slices, the all-gathers of parameters) run on real ranks in
tests/distributed/test_engine_shard_optimizer.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_mtl.engine.comm import Comm, Group
from dist_mtl.engine.layout import Layout
from dist_mtl.engine.protocols import Groups
from dist_mtl.engine.shard_optimizer import ShardedOptimizer, flatten_padded, shard_numel

SHAPES = [(7, 5), (5,), (3, 4, 2), (11,)]  # P = 35 + 5 + 24 + 11 = 75
HEADS = [(4, 3), (3,)]
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def groups_of_one(rank: int) -> Groups:
    one = Group("one", (rank,), None)
    return Groups(world=Group("world", (rank,), None), task=one, replica=one)


def sharded(
    name: str, shared: list[torch.Tensor], heads: list[torch.Tensor], d: int, k: int, rank: int
) -> tuple[ShardedOptimizer, torch.optim.Optimizer, torch.Tensor]:
    """Rank `rank` of a d x k layout: its parameters flattened and padded, the trainer's optimizer over
    every parameter, the sharded optimizer, and the (K S) shared gradient buffer it reads."""
    params = sum(p.numel() for p in shared)
    s = shard_numel(params, k, d, True)
    flat = flatten_padded(shared, k * s)
    main = OPTIMIZERS[name]([*shared, *heads])
    layout = Layout(replicas=d, task_parallel=k, split=(1,) * k)
    opt = ShardedOptimizer(main, shared, flat, heads, layout, Comm(rank, 60.0), groups_of_one(rank))
    direction = torch.zeros(k * s)
    opt.attach(direction)
    return opt, main, direction


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_rank_steps_bit_for_bit_like_the_whole_and_follows_the_learning_rate(name: str) -> None:
    shared, heads = tensors(SHAPES, 0), tensors(HEADS, 1)
    whole = [p.clone() for p in [*shared, *heads]]
    full = OPTIMIZERS[name](whole)
    opt, main, direction = sharded(name, shared, heads, 1, 1, 0)
    params = sum(p.numel() for p in shared)
    for step, lr in enumerate([0.01, 0.003, 0.02]):
        grads = tensors(SHAPES + HEADS, 10 + step)
        for p, g in zip(whole, grads, strict=True):
            p.grad = g.clone()
        for p, g in zip(heads, grads[len(SHAPES) :], strict=True):
            p.grad = g.clone()
        direction.zero_()
        direction[:params] = torch.cat([g.reshape(-1) for g in grads[: len(SHAPES)]])
        for group in (*full.param_groups, *main.param_groups):  # the trainer sets it on its own optimizer
            group["lr"] = lr
        full.step()
        opt.step()
        for got, want in zip([*shared, *heads], whole, strict=True):
            assert torch.equal(got, want)
    assert torch.equal(opt.flat[params:], torch.zeros_like(opt.flat[params:]))  # the padding stays zero


def test_every_rank_of_a_2x3_layout_steps_its_slice_like_the_whole() -> None:
    d, k = 2, 3
    shared0, heads0 = tensors(SHAPES, 0), tensors(HEADS, 1)
    params = sum(p.numel() for p in shared0)
    s = shard_numel(params, k, d, True)
    assert s % d == 0 and k * s >= params and (k * s - params) < k * d
    whole = [p.clone() for p in shared0]
    full = OPTIMIZERS["adam"](whole)
    grads = [tensors(SHAPES, 10 + step) for step in range(2)]
    for g in grads:
        for p, gp in zip(whole, g, strict=True):
            p.grad = gp.clone()
        full.step()
    padded = torch.zeros(k * s)
    padded[:params] = torch.cat([p.detach().reshape(-1) for p in whole])
    moments = {key: torch.zeros(k * s) for key in ("exp_avg", "exp_avg_sq")}
    for key, m in moments.items():
        m[:params] = torch.cat([full.state[p][key].reshape(-1) for p in whole])
    covered = torch.zeros(k * s, dtype=torch.int64)
    for rank in range(d * k):
        shared, heads = [p.clone() for p in shared0], [p.clone() for p in heads0]
        opt, _, direction = sharded("adam", shared, heads, d, k, rank)
        for g in grads:
            direction.zero_()
            direction[:params] = torch.cat([gp.reshape(-1) for gp in g])
            opt.inner.step()  # the slice alone; the all-gather is what the distributed test runs
        r, kk = divmod(rank, k)
        n = s // d
        at = slice(kk * s + r * n, kk * s + (r + 1) * n)
        covered[at] += 1
        assert torch.equal(opt.mine, padded[at])
        state = opt.state[opt.mine]
        for key, m in moments.items():
            assert torch.equal(state[key], m[at]), (rank, key)
        assert float(state["step"]) == 2.0
        assert set(opt.state) == {opt.mine}  # no heads stepped (no gradients): nothing else held
    assert torch.equal(covered, torch.ones_like(covered))  # the slices tile the padded parameters


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoint_state_is_the_single_process_format_and_loads_back(name: str) -> None:
    shared, heads = tensors(SHAPES, 0), tensors(HEADS, 1)
    whole = [p.clone() for p in [*shared, *heads]]
    full = OPTIMIZERS[name](whole)
    opt, main, direction = sharded(name, shared, heads, 1, 1, 0)
    params = sum(p.numel() for p in shared)

    def step(seed: int) -> None:
        grads = tensors(SHAPES + HEADS, seed)
        for p, g in zip(whole, grads, strict=True):
            p.grad = g.clone()
        for p, g in zip(heads, grads[len(SHAPES) :], strict=True):
            p.grad = g.clone()
        direction.zero_()
        direction[:params] = torch.cat([g.reshape(-1) for g in grads[: len(SHAPES)]])
        full.step()
        opt.step()

    step(10)
    step(11)
    index = {p: i for i, p in enumerate(main.param_groups[0]["params"])}
    saved = opt.gather_state(index)
    expected = full.state_dict()["state"]
    assert set(saved) == set(range(len(SHAPES)))
    for i, entry in saved.items():
        assert set(entry) == set(expected[i])
        for key, value in entry.items():
            assert value.shape == expected[i][key].shape and torch.equal(value, expected[i][key]), (i, key)
    # A fresh rank loads the whole optimizer's state_dict (what the trainer does on resume), keeps its
    # slice, and continues exactly like the optimizer that wrote it.
    shared2 = [p.detach().clone() for p in whole[: len(SHAPES)]]
    heads2 = [p.detach().clone() for p in whole[len(SHAPES) :]]
    opt2, main2, direction2 = sharded(name, shared2, heads2, 1, 1, 0)
    main2.load_state_dict(copy.deepcopy(full.state_dict()))
    opt2.load_full()
    assert set(main2.state) == {opt2.mine, *heads2}
    opt, main, direction, shared, heads = opt2, main2, direction2, shared2, heads2
    step(12)
    for got, want in zip([*shared, *heads], whole, strict=True):
        assert torch.equal(got, want)
