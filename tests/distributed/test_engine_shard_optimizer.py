"""engine.shard_optimizer (ZeRO-1 for `gramian`) against the single-process trainer, on real gloo ranks.

On 1x2, 2x1, 1x3 (T = 5: an uneven task split, and P not divisible by K, so the last shard is padded)
and 2x2, with Adam and with SGD-momentum under a decaying learning rate (the trainer sets the rate on
its own optimizer; the sharded step must follow it), the final checkpoint (every parameter, every
parameter's optimizer state in the single-process format, gathered from the slices) equals the
single-process trainer's within the harness tolerance, and the bytes the collective wrapper accounted
equal the byte model. Each rank's optimizer state is measured after the run (bytes of the tensors in
its optimizer's `state`): the shared parameters' part is (state tensors per parameter) x 4 x
ceil(P / W), 1/W of the single-process part up to the padding. A checkpoint written with the
optimizer sharded resumes on another layout (1x2 -> 2x1, 2x2 -> 1x4), with sharding off (2x2), and on
one process, and ends equal to the uninterrupted run.

One launch per world size (2, 3, 4) runs that size's cases in sequence, in this file's own worker
(`python tests/distributed/test_engine_shard_optimizer.py SPEC.json`: it needs each run's optimizer
after training, which the shared worker does not keep).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

if __name__ == "__main__":  # run as the worker: the repository root on the path, as the harness sets
    sys.path.insert(0, str(Path(__file__).parents[2]))

from tests.distributed.harness import BASE, compare, launch, load, single_process_references

pytestmark = [pytest.mark.distributed]

ADAM = ["balancer.name=mgda"]
# Two steps per epoch (48 samples, batches of 24): the rate halves after step 2 of 4
SGD = [
    "balancer.name=mgda",
    "optim.name=sgd",
    "optim.momentum=0.9",
    "optim.weight_decay=0.001",
    "data.train_size=48",
    "optim.lr_decay=0.5",
    "optim.decay_every=1",
]


def layout(d: int, k: int) -> list[str]:
    return [f"engine.replicas={d}", f"engine.task_parallel={k}", "engine.protocol=gramian"]


# name -> (overrides, those of a first part that ran to step 2 before the resume, or None)
CASES: dict[int, dict[str, tuple[list[str], list[str] | None]]] = {
    2: {
        "1x2-adam": ([*layout(1, 2), *ADAM], None),
        "1x2-sgd": ([*layout(1, 2), *SGD], None),
        "2x1-adam": ([*layout(2, 1), *ADAM], None),
        "2x1-sgd": ([*layout(2, 1), *SGD], None),
        "resume-1x2-to-2x1": ([*layout(2, 1), *ADAM], [*layout(1, 2), *ADAM]),
    },
    3: {
        "1x3-adam": ([*layout(1, 3), *ADAM], None),
        "1x3-sgd": ([*layout(1, 3), *SGD], None),
    },
    4: {
        "2x2-adam": ([*layout(2, 2), *ADAM], None),
        "2x2-sgd": ([*layout(2, 2), *SGD], None),
        "resume-2x2-to-1x4": ([*layout(1, 4), *ADAM], [*layout(2, 2), *ADAM]),
        "resume-2x2-to-unsharded": (
            [*layout(2, 2), *ADAM, "engine.shard_optimizer=false"],
            [*layout(2, 2), *ADAM],
        ),
    },
}
STEPS = 4
RESUME_AT = 2
# What a checkpoint holds of the training (the history differs by design after a resume: the first part
# evaluated at its last step)
STATE = ("model", "optimizer", "balancer", "step")


def state_bytes(state: dict[Any, dict[str, Any]]) -> int:
    """Bytes of the per-element state tensors (moments, momentum; not Adam's 0-dim step counts)."""
    return sum(
        v.numel() * v.element_size()
        for s in state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim()
    )


# --- the worker ------------------------------------------------------------------------------------


def run_case(case: dict[str, Any], world_size: int, meshes: dict[tuple[int, int], Any]) -> None:
    import torch.distributed as dist

    from dist_mtl.build import build_datasets
    from dist_mtl.config import load_config
    from dist_mtl.engine.launch import device_mesh
    from dist_mtl.engine.layout import resolve_layout
    from dist_mtl.engine.runtime import Engine
    from dist_mtl.trainer import train

    cpu = torch.device("cpu")
    kept: dict[str, Any] = {}

    class Kept(Engine):
        """The engine, keeping the model and the trainer's optimizer for the measurement."""

        def make_step(self, cfg: Any, model: Any, balancer: Any, optimizer: Any) -> Any:
            kept.update(model=model, optimizer=optimizer)
            return super().make_step(cfg, model, balancer, optimizer)

    def engine(overrides: list[str]) -> tuple[Any, Any, Any]:
        cfg = load_config(None, overrides)
        datasets = build_datasets(cfg)
        lay = resolve_layout(cfg, world_size, len(datasets[0].tasks))
        key = (lay.replicas, lay.task_parallel)
        if key not in meshes:
            meshes[key] = device_mesh(lay, cpu, cfg.engine.timeout_s)
        return cfg, Kept(cfg, lay, meshes[key], cpu), datasets

    if case["first"]:
        cfg, backend, datasets = engine(case["first"])
        train(cfg, backend=backend, datasets=datasets)
    cfg, backend, datasets = engine(case["overrides"])
    train(cfg, resume=bool(case["first"]), backend=backend, datasets=datasets)
    heads = {p for p in kept["model"].parameters()} - set(kept["model"].shared_parameters())
    state = kept["optimizer"].state
    out = Path(cfg.run_dir) / f"state_rank{dist.get_rank()}.json"
    out.write_text(
        json.dumps(
            {
                "total": state_bytes(state),
                "heads": state_bytes({p: s for p, s in state.items() if p in heads}),
                "shared": state_bytes({p: s for p, s in state.items() if p not in heads}),
            }
        )
    )


def main() -> int:
    from tests.distributed.worker import serve

    return serve(run_case)


# --- the tests -------------------------------------------------------------------------------------


def overrides_in(run_dir: Path, overrides: list[str], steps: int = STEPS) -> list[str]:
    return [*BASE, *overrides, f"train.steps={steps}", "train.checkpoint_every=2", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Launch each world size once; returns the directory holding one run directory per case."""
    done: dict[int, Path] = {}
    for world_size, cases in CASES.items():
        out = tmp_path_factory.mktemp(f"shard{world_size}")
        spec = [
            {
                "overrides": overrides_in(out / name, overrides),
                "first": overrides_in(out / name, first, RESUME_AT) if first else None,
            }
            for name, (overrides, first) in cases.items()
        ]
        path = out / "spec.json"
        path.write_text(json.dumps({"cases": spec}))
        runs_, _ = launch(world_size, [str(Path(__file__)), str(path)], timeout=240)
        failed = [i for i, run in enumerate(runs_) if run.returncode != 0]
        assert not failed, "\n".join(f"--- rank {i}\n{runs_[i].output}" for i in failed)
        done[world_size] = out
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return single_process_references(tmp_path_factory, BASE)


def shared_state_bytes(ckpt: dict[str, Any], shared: int) -> int:
    """Bytes of the shared parameters' state (the first `shared` indices) in a single-process checkpoint."""
    state = ckpt["optimizer"]["state"]
    return state_bytes({i: s for i, s in state.items() if i < shared})


def test_sharded_runs_equal_single_process_and_hold_1_over_w_of_the_state(runs, reference) -> None:
    from dist_mtl.build import build_datasets, build_model_for
    from dist_mtl.config import load_config
    from dist_mtl.engine.shard_optimizer import shard_numel
    from tests.distributed.test_engine_contract import accounted_bytes_errors

    failures = []
    for world_size, cases in CASES.items():
        for name, (overrides, first) in cases.items():
            run_dir = runs[world_size] / name
            expected = reference(overrides)
            got = load(run_dir / "checkpoints" / "last.pt")
            diffs = compare({k: got[k] for k in STATE}, {k: expected[k] for k in STATE})
            failures += [f"{name}: {d}" for d in diffs]
            if first is None:
                failures += [f"{name}: {e}" for e in accounted_bytes_errors(run_dir, overrides, world_size)]
            cfg = load_config(None, overrides_in(run_dir, overrides))
            model = build_model_for(cfg, build_datasets(cfg)[0])
            shared = model.shared_parameters()
            params = sum(p.numel() for p in shared)
            single = shared_state_bytes(expected, len(shared))
            per_tensor = single // (4 * params)  # state tensors per parameter: Adam 2, SGD-momentum 1
            assert single == per_tensor * 4 * params and per_tensor in (1, 2), (name, single)
            for rank in range(world_size):
                got = json.loads((run_dir / f"state_rank{rank}.json").read_text())
                want = single  # unsharded: every rank holds the whole state
                if cfg.engine.shard_optimizer:  # n = S / D, 1/W of P up to the padding of S
                    d, k = cfg.engine.replicas, cfg.engine.task_parallel
                    chunks = cfg.engine.overlap_chunks if cfg.engine.overlap else 1
                    n = shard_numel(params, k, d, True, chunks) // d
                    assert 0 <= n * world_size - params < world_size * chunks, (name, n)
                    want = per_tensor * 4 * n
                print(f"{name} rank {rank}: shared state {got['shared']} B of {single} B single-process")
                if got["shared"] != want:
                    failures.append(f"{name} rank {rank}: shared-parameter state {got['shared']} B != {want}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(120)
def test_a_sharded_checkpoint_resumes_on_one_process(runs, reference, tmp_path: Path) -> None:
    """The sharded 2x2 checkpoint of step 2 (single-process format) resumes on one process."""
    import shutil

    from dist_mtl.config import load_config
    from dist_mtl.trainer import train

    run_dir = tmp_path / "one"
    shutil.copytree(runs[4] / "2x2-adam", run_dir)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        if path.name != "step_00000002.pt":
            path.unlink()
    overrides = [*ADAM]
    train(load_config(None, overrides_in(run_dir, overrides)), resume=True)
    got, expected = load(run_dir / "checkpoints" / "last.pt"), reference([*layout(2, 2), *ADAM])
    diffs = compare({k: got[k] for k in STATE}, {k: expected[k] for k in STATE})
    assert not diffs, "\n".join(diffs)


if __name__ == "__main__":
    sys.exit(main())
