"""The engine on the public-API path that older torch releases take (`dist_mtl.engine.compat`).

DIST_MTL_PUBLIC_GROUPS=1 makes this torch build the layout's groups with `new_subgroups_by_enumeration`
instead of `init_device_mesh(backend_override=...)`: the runs must still equal the single-process
reference, and a stalled rank must still trip engine.timeout_s on a sub-group (the groups carry it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_mtl.engine.compat import PUBLIC_GROUPS_ENV
from tests.distributed.harness import BASE, WORKER, compare, launch, load
from tests.distributed.test_engine_contract import layout_overrides, reference  # noqa: F401 (fixture)

pytestmark = [pytest.mark.distributed]

CASES = {
    "2x2-gramian": [*layout_overrides(2, 2), "balancer.name=mgda", "engine.protocol=gramian"],
    "1x4-gather": [*layout_overrides(1, 4), "balancer.name=getmtl", "engine.protocol=gather"],
    "rep4": ["train.mode=rep", "engine.protocol=rep", "balancer.name=mgda"],
}


@pytest.mark.timeout(300)
def test_public_group_path_equals_single_process(tmp_path: Path, reference) -> None:  # noqa: F811
    cases = [{"overrides": [*BASE, *o, f"run_dir={tmp_path / name}"]} for name, o in CASES.items()]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    runs, _ = launch(4, [str(WORKER), str(spec)], timeout=240, env={PUBLIC_GROUPS_ENV: "1"})
    failed = [f"--- rank {i}\n{r.output}" for i, r in enumerate(runs) if r.returncode != 0]
    assert not failed, "\n".join(failed)
    failures = []
    for name, overrides in CASES.items():
        diffs = compare(load(tmp_path / name / "checkpoints" / "last.pt"), reference(overrides))
        failures += [f"{name}: {d}" for d in diffs[:5]]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(120)
def test_public_group_path_times_out_a_stalled_rank(tmp_path: Path) -> None:
    """A rank stalled at step 2 of a 2x2 gramian run: its task-group peer fails within the timeout."""
    overrides = [*BASE, *CASES["2x2-gramian"], "engine.timeout_s=5", f"run_dir={tmp_path / 'run'}"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": [{"overrides": overrides}]}))
    env = {PUBLIC_GROUPS_ENV: "1", "DIST_MTL_FAULT": "stall:3:2"}
    runs, started = launch(4, [str(WORKER), str(spec)], timeout=100, env=env, kill_after=20)
    peer = runs[2]  # rank 2 shares rank 3's task group
    assert peer.returncode not in (0, None), peer.output
    assert peer.ended is not None and peer.ended - started < 60, peer.ended - started
    assert "timeout" in peer.output.lower() or "timed out" in peer.output.lower(), peer.output[-2000:]
