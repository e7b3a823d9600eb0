"""Single-process checks of the engine's plan: layouts, up-front config errors, traffic models, codecs.

No process group is created here; `run_distributed` must reject bad input before it would create one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_mtl.config import ConfigError, load_config
from dist_mtl.engine import traffic
from dist_mtl.engine.codecs import build_codec, payload_bytes
from dist_mtl.engine.layout import Layout, balanced_split, check_engine_config, resolve_layout
from dist_mtl.train import run_distributed
from tests.distributed.harness import sketch_matrix

TINY = [
    "data.name=synthetic",
    "data.num_tasks=5",
    "data.train_size=64",
    "data.test_size=16",
    "data.batch_size=24",
]


def cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def test_layout_numbering_split_and_groups() -> None:
    layout = resolve_layout(cfg("engine.replicas=2", "engine.task_parallel=3"), 6, 5)
    assert layout == Layout(2, 3, (2, 2, 1))
    assert [list(layout.tasks_of(k)) for k in range(3)] == [[0, 1], [2, 3], [4]]
    assert layout.coords(4) == (1, 1)
    assert layout.task_group(1) == [3, 4, 5] and layout.replica_group(2) == [2, 5]
    assert balanced_split(7, 4) == (2, 2, 2, 1)
    assert resolve_layout(cfg("engine.split=[1,4]"), 2, 5).split == (1, 4)
    assert resolve_layout(cfg(), 4, 5) == Layout(1, 4, (2, 1, 1, 1))  # default: one task group of W ranks
    assert resolve_layout(cfg("train.mode=rep", "engine.protocol=rep"), 3, 5) == Layout(3, 1, (5,))


@pytest.mark.parametrize(
    ("overrides", "world", "tasks", "message"),
    [
        ((), 8, 5, "engine.task_parallel K=8 exceeds the number of tasks T=5"),
        (("engine.replicas=2", "engine.task_parallel=3"), 4, 5, "2 x 3 = 6 but the world size is W=4"),
        (("engine.task_parallel=3",), 4, 5, "engine.task_parallel K=3 does not divide the world size W=4"),
        (("engine.replicas=3",), 4, 5, "engine.replicas D=3 does not divide the world size W=4"),
        (
            ("engine.split=[2,2,1]",),
            2,
            5,
            "engine.split has 3 entries [2, 2, 1] but engine.task_parallel is K=2",
        ),
        (("engine.split=[2,2]",), 2, 5, "sum to T=5; it sums to 4"),
        (
            ("engine.protocol=rep",),
            2,
            5,
            "with train.mode 'exact' engine.protocol must be one of gather, gramian",
        ),
        (
            ("train.mode=rep", "engine.protocol=gramian"),
            2,
            5,
            "with train.mode 'rep' engine.protocol must be one of rep",
        ),
        (
            ("engine.protocol=gramian", "engine.compression=fp16"),
            2,
            5,
            "engine.compression 'fp16' applies only",
        ),
        (
            ("train.mode=rep", "engine.protocol=rep", "engine.task_parallel=2"),
            4,
            5,
            "engine.task_parallel must",
        ),
        (
            ("engine.replicas=2", "data.batch_size=25"),
            4,
            5,
            "data.batch_size 25 is not divisible by engine.rep",
        ),
        (("train.mode=rep", "engine.protocol=rep"), 5, 5, "data.batch_size 24 is not divisible by the world"),
    ],
)
def test_impossible_layouts_and_pairings_name_the_field(overrides, world, tasks, message) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        resolve_layout(cfg(*overrides), world, tasks)
    assert message in str(err.value)


def test_out_of_range_compression_options_are_rejected_at_load() -> None:
    with pytest.raises(ConfigError, match="engine.topk_ratio must be in"):
        cfg("engine.protocol=gather", "engine.compression=topk", "engine.topk_ratio=1.5")
    with pytest.raises(ConfigError, match="engine.sketch_size must be > 0"):
        cfg("engine.protocol=sketch", "engine.sketch_size=0")
    with pytest.raises(ConfigError, match="engine.compression must be one of"):
        cfg("engine.compression=int8")
    assert check_engine_config(cfg("engine.protocol=gather", "engine.compression=topk"), 2) == (1, 2)


@pytest.mark.timeout(60)
def test_run_distributed_rejects_bad_input_before_any_process_group(monkeypatch) -> None:
    # A reachable-looking rendezvous: if the engine tried to create the group it would wait 60 s for peers.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    bad = cfg("engine.task_parallel=8", "engine.timeout_s=60")
    with pytest.raises(ConfigError, match="engine.task_parallel K=8 does not divide the world size W=4"):
        run_distributed(bad)
    assert not dist.is_initialized()


@pytest.mark.parametrize("size", range(2, 9))
def test_collective_models_conserve_bytes(size: int) -> None:
    """What the ranks send is what the ranks receive, for every collective model and root."""
    n = 4 * 1000
    for root in range(size):
        models = {
            "reduce": lambda r, root=root: traffic.reduce_bytes(n, size, r == root),
            "broadcast": lambda r, root=root: traffic.broadcast_bytes(n, size, (r - root) % size),
            "gather": lambda r, root=root: traffic.gather_bytes(n, size, r == root),
            "all-reduce": lambda r: traffic.all_reduce_bytes(n, size),
            "all-gather": lambda r: traffic.all_gather_bytes(n, size),
        }
        for name, model in models.items():
            moved = [model(r) for r in range(size)]
            assert sum(s for s, _ in moved) == sum(r for _, r in moved), name
    assert [traffic.broadcast_bytes(1, 4, r)[0] for r in range(4)] == [2, 1, 0, 0]  # measured with gloo


@pytest.mark.parametrize("protocol", ["gather", "gramian", "sketch", "rep"])
@pytest.mark.parametrize("layout", [(1, 2), (1, 3), (2, 2), (2, 3), (1, 8)])
def test_step_bytes_conserve_and_match_the_readme_formula(protocol: str, layout: tuple[int, int]) -> None:
    d, k = layout
    split = balanced_split(11, k)
    shape = traffic.StepShape(
        params=100_003, split=split, replicas=d, head_params=tuple(7 * n for n in split), all_head_params=77
    )
    if protocol == "rep":
        shape = traffic.StepShape(params=100_003, split=(11,), replicas=d * k, all_head_params=77)
    moved = [traffic.step_bytes(protocol, shape, r) for r in range(d * k)]
    assert sum(s for s, _ in moved) == sum(r for _, r in moved)
    if protocol == "gramian" and d == 1 and 11 % k == 0:
        p, t = shape.params, 11
        formula = (t / k + 1) * (k - 1) / k * p * 4
        assert all(abs(s - formula) / formula < 0.01 for s, _ in moved[1:])


def test_codecs() -> None:
    """Every codec: rows [g_t | L_t] in, the wire's size as `payload_bytes` says, losses bit-exact, the
    gradients untouched, and the Gramian each one defines (count-sketch: (S G)(S G)^T exactly)."""
    torch.manual_seed(0)
    grads, losses = torch.randn(3, 50), torch.rand(3)
    rows = torch.cat([grads, losses[:, None]], dim=1)
    cpu = torch.device("cpu")
    none = build_codec("none", params=50, topk_ratio=0.1, sketch_size=8, sketch_seed=0, device=cpu)
    assert none.encode(rows) is rows  # lossless gather sends the block itself
    sketched = grads.double() @ sketch_matrix(50, 4096, 0).T
    expected = {"countsketch": sketched @ sketched.T}
    for name in ("none", "fp16", "bf16", "topk", "countsketch"):
        codec = build_codec(name, params=50, topk_ratio=1.0, sketch_size=4096, sketch_seed=0, device=cpu)
        before = rows.clone()
        wire = codec.encode(rows)
        assert torch.equal(rows, before), name  # count-sketch flips signs in place, and back exactly
        shape = traffic.StepShape(params=50, split=(3,), compression=name, topk_ratio=1.0, sketch_size=4096)
        assert wire.numel() * wire.element_size() == payload_bytes(name, shape), name
        gramian, got_losses = codec.gramian(torch.cat([wire, wire]))
        assert torch.equal(got_losses, torch.cat([losses, losses]))  # losses travel bit-exact
        assert gramian.shape == (6, 6)
        tol = {"fp16": 1e-2, "bf16": 1e-1}.get(name, 1e-4)
        want = expected.get(name, (grads @ grads.T).double())
        assert torch.allclose(gramian[:3, :3].double(), want, rtol=1e-5, atol=tol), name
    topk = build_codec("topk", params=50, topk_ratio=0.1, sketch_size=8, sketch_seed=0, device=cpu)
    gramian, _ = topk.gramian(topk.encode(rows))
    index = grads.abs().topk(5, dim=1).indices
    kept = torch.zeros_like(grads).scatter_(1, index, grads.gather(1, index))
    assert torch.allclose(gramian, kept @ kept.T, atol=1e-5)
    assert torch.equal(gramian, gramian.T)
