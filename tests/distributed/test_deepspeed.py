"""engine.backend deepspeed (issue 11) against the torch.distributed backend, on 2 gloo ranks.

For ZeRO 1 and 2 in exact mode (gramian, 1x2: heads split between the ranks) and rep mode (2x1), ZeRO 3
in rep mode and, beyond the issue, ZeRO 3 in exact mode, ZeRO 0 and ZeRO 2 with CPU optimizer offload,
the checkpoint after 4 Adam steps (every parameter, every optimizer state, the balancer) EQUALS the
torch backend's bit for bit. Why no tolerance is needed: the protocol leaves the same d on every rank;
the surrogate <theta, d> has gradient exactly d; DeepSpeed averages W = 2 identical copies ((d + d) / 2
is exact in binary floating point); and both sides run the same torch.optim.Adam (single-tensor path on
CPU), whose update is elementwise, so flattening or partitioning the tensors changes no rounding.
bf16 cannot be equal: its checkpoint holds parameters that are bfloat16 values, close to float32's.

Checkpoints (issue 11.4): a DeepSpeed ZeRO 2 run stopped at step 2 resumes on the torch backend, and a
torch run resumes on DeepSpeed ZeRO 3 (rep) and ZeRO 1 (exact), each equal to the uninterrupted torch
run: the checkpoint is in the single-process format either way.

One launch runs every case in one process group (run as a script, this file is the worker); the
config checks that refuse bad input before any process starts run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_mtl.config import load_config
from dist_mtl.errors import ConfigError

ROOT = Path(__file__).parents[2]
if __name__ == "__main__":  # the worker: run from tests/distributed, the project root on the path
    sys.path.insert(0, str(ROOT))

from tests.distributed.harness import BASE, compare, launch, load  # noqa: E402

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeed is not installed (pip install -e '.[deepspeed]'; .ci/run installs it)"

EXACT = ["engine.protocol=gramian", "engine.task_parallel=2", "balancer.name=mgda"]
REP = ["train.mode=rep", "balancer.name=mgda"]
DS = ["engine.backend=deepspeed"]
# The torch backend as the deepspeed one resolves it: DeepSpeed's ZeRO replaces the engine's sharded
# optimizer, so the reference steps the trainer's optimizer as the protocol's plain path does (the
# contract test proves the sharded path equal to it).
TORCH_EXACT = [*EXACT, "engine.shard_optimizer=false"]


def zero(stage: int, *more: str) -> list[str]:
    return [*DS, f"engine.zero_stage={stage}", *more]


# name -> (overrides, the torch-backend case it must equal)
EQUAL_CASES: dict[str, tuple[list[str], str]] = {
    "exact-z1": ([*EXACT, *zero(1)], "exact-torch"),
    "exact-z2": ([*EXACT, *zero(2)], "exact-torch"),
    "exact-z3": ([*EXACT, *zero(3)], "exact-torch"),
    "exact-z0": ([*EXACT, *zero(0)], "exact-torch"),
    "exact-z2-offload": ([*EXACT, *zero(2, "engine.offload_optimizer=true")], "exact-torch"),
    "rep-z1": ([*REP, *zero(1)], "rep-torch"),
    "rep-z2": ([*REP, *zero(2)], "rep-torch"),
    "rep-z3": ([*REP, *zero(3)], "rep-torch"),
}
# name -> (overrides of the first 2 steps, overrides of the resumed steps 3-4, the uninterrupted run)
RESUME_CASES: dict[str, tuple[list[str], list[str], str]] = {
    "resume-exact-z2-to-torch": ([*EXACT, *zero(2)], TORCH_EXACT, "exact-torch"),
    "resume-exact-torch-to-z1": (TORCH_EXACT, [*EXACT, *zero(1)], "exact-torch"),
    "resume-rep-torch-to-z3": (REP, [*REP, *zero(3)], "rep-torch"),
}
# What a resumed run must carry over exactly (its history and restart count say it was resumed).
TRAINED_STATE = ("model", "optimizer", "balancer", "step")
BF16 = [*REP, *zero(2, "engine.bf16=true")]


def cases() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "exact-torch": {"overrides": TORCH_EXACT},
        "rep-torch": {"overrides": REP},
    }
    out |= {name: {"overrides": o} for name, (o, _) in EQUAL_CASES.items()}
    out |= {name: {"overrides": second, "first": first} for name, (first, second, _) in RESUME_CASES.items()}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        out["rep-z2-bf16"] = {"overrides": BF16}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    spec = {
        name: {**case, "overrides": [*BASE, *case["overrides"], f"run_dir={out / name}"]}
        for name, case in cases().items()
    }
    for case in spec.values():
        if "first" in case:
            case["first"] = [*BASE, *case["first"]]
    path = out / "spec.json"
    path.write_text(json.dumps({"cases": spec}))
    ranks, _ = launch(2, [__file__, str(path)], timeout=300)
    failed = [i for i, r in enumerate(ranks) if r.returncode != 0]
    assert not failed, "\n".join(
        f"--- rank {i} (exit {ranks[i].returncode})\n{ranks[i].output}" for i in failed
    )
    return out


def checkpoint(out: Path, name: str) -> dict[str, Any]:
    return load(out / name / "checkpoints" / "last.pt")


@pytest.mark.distributed
@pytest.mark.timeout(360)
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_equals_torch_backend(runs: Path) -> None:
    """ZeRO 0-3 in exact and rep modes (and offload): the torch backend's checkpoint, bit for bit."""
    failures = []
    for name, (_, expected) in EQUAL_CASES.items():
        diffs = compare(checkpoint(runs, name), checkpoint(runs, expected), name, rtol=0.0, atol=0.0)
        failures += diffs[:3]
    assert not failures, "\n".join(failures)
    torch_run = checkpoint(runs, "rep-torch")
    assert torch_run["optimizer"]["state"], "the reference holds no optimizer state"


@pytest.mark.distributed
@pytest.mark.timeout(360)
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_checkpoints_resume_across_backends(runs: Path) -> None:
    """DeepSpeed -> torch and torch -> DeepSpeed resumes equal the uninterrupted torch run."""
    failures = []
    for name, (_, _, expected) in RESUME_CASES.items():
        got = checkpoint(runs, name)
        assert got["step"] == 4 and got["restarts"] == 1, f"{name}: not a resumed run to step 4"
        ref = checkpoint(runs, expected)
        for key in TRAINED_STATE:
            failures += compare(got[key], ref[key], f"{name}/{key}", rtol=0.0, atol=0.0)[:3]
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.timeout(360)
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_bf16_trains_bfloat16_parameters(runs: Path) -> None:
    """bf16: the encoder the protocols compute with holds bfloat16 values (a float32 run's would not),
    within a few bfloat16 steps of the float32 run; the heads (not DeepSpeed's) stay float32-exact."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 support (engine.bf16 is refused at load here)")
    got, ref = checkpoint(runs, "rep-z2-bf16")["model"], checkpoint(runs, "rep-torch")["model"]
    encoder = [k for k in got if k.startswith("encoder.")]
    assert encoder
    for key in encoder:
        value = got[key]
        assert value.dtype == torch.float32
        assert torch.equal(value, value.bfloat16().float()), f"{key}: not bfloat16 values"
        # 4 Adam steps of lr 0.01 move a coordinate by at most ~0.04; bf16 rounding of |w| <= 1 by 2^-8
        assert (value - ref[key]).abs().max() < 2e-2, key
    assert not torch.equal(got[encoder[0]], ref[encoder[0]])


# -- bad input, refused at load (before any process) --------------------------------------------


def test_deepspeed_fields_need_the_deepspeed_backend() -> None:
    with pytest.raises(ConfigError, match=r"engine.zero_stage 2 applies only with engine.backend deepspeed"):
        load_config(None, ["engine.zero_stage=2"])
    with pytest.raises(ConfigError, match="engine.backend must be one of torch, deepspeed"):
        load_config(None, ["engine.backend=horovod"])


def test_missing_deepspeed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deepspeed\]'"):
        load_config(None, DS)


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_options_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="engine.zero_stage must be 0, 1, 2 or 3"):
        load_config(None, zero(4))
    with pytest.raises(ConfigError, match=r"engine.offload_optimizer needs engine.zero_stage >= 1"):
        load_config(None, zero(0, "engine.offload_optimizer=true"))
    with pytest.raises(ConfigError, match=r"engine.bf16 needs engine.zero_stage >= 1"):
        load_config(None, zero(0, "engine.bf16=true"))
    with pytest.raises(ConfigError, match="engine.deepspeed_config: no such file"):
        load_config(None, [*DS, f"engine.deepspeed_config={tmp_path / 'none.json'}"])
    for key, value in [
        ("optimizer", {"type": "AdamW"}),
        ("fp16", {"enabled": True}),
        ("gradient_clipping", 1.0),
        ("scheduler", {"type": "WarmupLR"}),
    ]:
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({key: value}))
        with pytest.raises(ConfigError, match=f"engine.deepspeed_config: '{key}' is not accepted"):
            load_config(None, [*DS, f"engine.deepspeed_config={path}"])


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_bf16_refused_where_the_cpu_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="engine.bf16 true: this CPU .* has no bfloat16 support"):
        load_config(None, [*zero(2), "engine.bf16=true", "train.device=cpu"])


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_our_fields_override_the_json_with_a_note(tmp_path: Path) -> None:
    from dist_mtl.deepspeed_settings import BUCKET_ELEMENTS, deepspeed_settings

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    cfg = load_config(None, [*zero(1), f"engine.deepspeed_config={path}"])
    settings, notes = deepspeed_settings(cfg.engine, 2)
    assert settings["zero_optimization"] == {
        "stage": 1,
        "reduce_bucket_size": 1000,  # the file's
        "allgather_bucket_size": BUCKET_ELEMENTS,  # ours where the file is silent
        "offload_optimizer": {"device": "none"},
    }
    assert settings["train_batch_size"] == 2
    assert notes == [f"engine.zero_stage=1 overrides zero_optimization.stage=3 from {path}"]
    assert cfg.engine.shard_optimizer is False  # ZeRO shards instead


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
def test_one_process_refuses_the_deepspeed_backend(tmp_path: Path) -> None:
    from dist_mtl.train import run_single

    cfg = load_config(None, [*BASE, *zero(1), f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="engine.backend 'deepspeed' runs the distributed engine"):
        run_single(cfg)


# -- the worker ----------------------------------------------------------------------------------


def run_case(case: dict[str, Any], world_size: int, meshes: dict[tuple[int, int], Any]) -> None:
    """Train one case (its first part first, then resumed) on this rank with the configured backend."""
    import torch.distributed as dist

    from dist_mtl.build import build_datasets
    from dist_mtl.engine.launch import device_mesh
    from dist_mtl.engine.layout import resolve_layout
    from dist_mtl.train import build_engine
    from dist_mtl.trainer import train

    cpu = torch.device("cpu")

    def run(overrides: list[str], resume: bool, steps: int | None = None) -> None:
        cfg = load_config(None, overrides + ([f"train.steps={steps}"] if steps else []))
        datasets = build_datasets(cfg)
        layout = resolve_layout(cfg, world_size, len(datasets[0].tasks))
        key = (layout.replicas, layout.task_parallel)
        if key not in meshes:
            meshes[key] = device_mesh(layout, cpu, cfg.engine.timeout_s)
        engine = build_engine(cfg, layout, meshes[key], cpu)
        train(cfg, resume=resume, overwrite=not resume, backend=engine, datasets=datasets)
        getattr(engine, "close", lambda: None)()
        dist.barrier()

    if "first" in case:
        run_dir = next(o for o in reversed(case["overrides"]) if o.startswith("run_dir="))
        run([*case["first"], run_dir], resume=False, steps=2)
        run(case["overrides"], resume=True)
    else:
        run(case["overrides"], resume=False)


def main() -> int:
    from tests.distributed.worker import serve

    return serve(run_case)


if __name__ == "__main__":
    sys.exit(main())
