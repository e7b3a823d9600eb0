"""The coordinator's peak tensor memory during a step equals each protocol's formula (README).

Two ranks run every case of `CASES` (worker kind `memory`): the model, the optimizer and the engine's
step are built, then two steps run, all under `torch.profiler(profile_memory=True)`, whose allocation
events give the tensor memory allocated and still live at every moment (worker.measure_memory). The
peak inside a step, less the model's parameters, must equal the formula below to within a tenth of
one gradient (P / 10 floats): the residual is the activations and the terms that do not grow with P
(heads, T x T, indices). A T x P copy anywhere in the step, a dense top-k matrix, a second copy of
the gathered rows or a received buffer for a group of one would add at least T_max x P and fail.

Units: float32 elements. P shared parameters, L the largest shared parameter (autograd allocates a
parameter's gradient before adding it into `.grad`), T tasks, K ranks per task group, T_max = ceil(T/K),
T_0 rank 0's tasks, R = K T_max gathered rows, B = T_max (P + 1) a rank's gather block, S = ceil(P/K).
The checksum is off (its float64 sums are the checksum's own cost) and SGD keeps no state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from dist_mtl.config import load_config
from dist_mtl.engine.codecs import CHUNK, topk_count
from tests.distributed.harness import BASE, run_worker

pytestmark = [pytest.mark.distributed]

MEMORY = [
    "engine.checksum_every=0",
    "data.batch_size=4",  # activations small beside P
    "data.input_dim=32",
    "model.hidden=[256,256]",
    "model.rep_dim=128",  # P = 107,136, L = 65,536
    "optim.name=sgd",
    "optim.momentum=0",
    "balancer.name=mgda",
]
CASES = {
    "gather-1x2": ["engine.task_parallel=2", "engine.protocol=gather"],
    "gather-2x1": ["engine.replicas=2", "engine.protocol=gather"],
    "gramian-1x2": ["engine.task_parallel=2", "engine.protocol=gramian"],
    "gramian-2x1": ["engine.replicas=2", "engine.protocol=gramian"],
    "unsharded-1x2": ["engine.task_parallel=2", "engine.protocol=gramian", "engine.shard_optimizer=false"],
    "unsharded-2x1": ["engine.replicas=2", "engine.protocol=gramian", "engine.shard_optimizer=false"],
    "fp16-1x2": ["engine.task_parallel=2", "engine.protocol=gather", "engine.compression=fp16"],
    "bf16-2x1": ["engine.replicas=2", "engine.protocol=gather", "engine.compression=bf16"],
    "topk-1x2": [
        "engine.task_parallel=2",
        "engine.protocol=gather",
        "engine.compression=topk",
        "engine.topk_ratio=0.01",
    ],
    "sketch-1x2": ["engine.task_parallel=2", "engine.protocol=sketch", "engine.sketch_size=512"],
    "countsketch-2x1": [
        "engine.replicas=2",
        "engine.protocol=gather",
        "engine.compression=countsketch",
        "engine.sketch_size=512",
    ],
    "rep": ["train.mode=rep", "engine.protocol=rep"],
}
TOLERANCE = 0.1  # of P


@dataclass(frozen=True)
class Shape:
    params: int  # P
    largest: int  # L
    tasks: int  # T
    k: int  # K
    replicas: int = 1  # D
    sharded: bool = False  # gramian with engine.shard_optimizer

    @property
    def t_max(self) -> int:
        return -(-self.tasks // self.k)


def peak_floats(protocol: str, compression: str, s: Shape, topk_ratio: float, sketch_size: int) -> int:
    """Rank 0's peak tensor memory during a step beyond the model, up to terms that do not grow with P."""
    p, t, k, t_max, big = s.params, s.tasks, s.k, s.t_max, s.largest
    if protocol == "rep":  # the flat shared gradient
        return p + big
    if protocol == "gramian":
        # block (K, T_0, S), d (K S); with K > 1 the received shards T S, d's shard S, and gloo's
        # all-gather stages d (K S); with K = 1 the block is the shards and d is formed in place.
        # Sharded optimizer: d's shard is in place, and gloo stages the outputs of the parameter
        # all-gathers instead (K S over the task group; S over the replica group when D > 1)
        shard, t_0 = -(-p // k), t_max
        received = t * shard + (0 if s.sharded else shard) if k > 1 else 0
        staged = k * shard if k > 1 else (shard if s.sharded and s.replicas > 1 else 0)
        return k * t_0 * shard + k * shard + received + max(big, staged)
    rows, block = k * t_max, t_max * (p + 1)
    if protocol == "gather" and compression == "none":  # the K blocks gathered (its own first) and d
        return k * block + p + big
    if compression in ("fp16", "bf16"):  # block, d, the 16-bit codes, float32 widening CHUNK at a time
        return block + p + rows * (p + 2) // 2 + max(big, rows * min(p, max(1, CHUNK // rows)))
    if compression == "topk":  # block, d, the sparse rows; one densified row and O(nnz) to form M
        count = topk_count(p, topk_ratio)
        return block + p + rows * (2 * count + 1) + max(big, p + 4 * rows * count)
    # count-sketch: block, d, hashes (int64 bucket + float32 sign), the sketches
    return block + p + 3 * p + rows * (sketch_size + 1) + big


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("memory")
    cases = [
        {"kind": "memory", "overrides": [*BASE, *MEMORY, *o, f"run_dir={out / name}"]}
        for name, o in CASES.items()
    ]
    run_worker(2, {"cases": cases}, out / "spec.json")
    return {name: json.loads((out / name / "rank0.json").read_text()) for name in CASES}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_coordinator_peak_memory_matches_the_formula(name: str, measured: dict[str, dict]) -> None:
    cfg = load_config(None, [*BASE, *MEMORY, *CASES[name]])
    e = cfg.engine
    got = measured[name]
    shape = Shape(
        params=got["shared_params"],
        largest=got["largest_shared"],
        tasks=cfg.data.num_tasks,
        k=1 if e.protocol == "rep" else max(e.task_parallel, 1),
        replicas=max(e.replicas, 1),
        sharded=e.shard_optimizer and e.protocol == "gramian",
    )
    protocol = "gather" if e.protocol == "sketch" else e.protocol
    compression = "countsketch" if e.protocol == "sketch" else e.compression
    formula = 4 * peak_floats(protocol, compression, shape, e.topk_ratio, e.sketch_size)
    gradient = 4 * shape.params
    for peak in got["step_peak_bytes"]:
        print(f"\n{name}: peak {peak / gradient:.3f} P floats, formula {formula / gradient:.3f} P")
        assert -TOLERANCE / 2 * gradient <= peak - formula <= TOLERANCE * gradient, (peak, formula)
