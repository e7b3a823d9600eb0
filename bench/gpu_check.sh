#!/usr/bin/env bash
# The checks that need one CUDA GPU, in under 5 minutes, ending with one Markdown table:
#   (a) the gpu-marked tests:  python -m pytest -q -m gpu tests
#   (b) single-rank CUDA step times: exact MGDA (T backward passes) vs uniform (one backward of the
#       mean loss) vs rep (MGDA-UB) on bench/step.py's CNN and MLP at T = 4 and 8
#       (bench/step.py --single-process-only --device cuda: each step timed by torch.cuda.synchronize
#       around the whole step, never per phase)
#   (c) the MGDA balancer (min-norm solver) on a GPU-resident float32 Gramian, T = 40 and 1000:
#       build_balancer("mgda")(M_cuda), the device-to-host copy included, beside the copy alone and
#       the same call on a host float64 Gramian (bench/solvers.py's Gramians)
# Without a CUDA device it exits 1 with a message before running anything.
#
# Usage: bash bench/gpu_check.sh [RESULTS_DIR]
#   RESULTS_DIR (default: a new temporary directory) receives pytest.log, step.json, step.log,
#   solver.json and table.md. PYTHON picks the interpreter (default: .venv/bin/python if present,
#   else python3). Exit status: 0 when every part ran and passed, 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

fail() {
    echo "gpu_check.sh: error: $*" >&2
    exit 1
}

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "no Python interpreter '$PYTHON' (set PYTHON=...)"

# No CUDA device: say why and stop (exit 1) before any part runs.
"$PYTHON" - <<'EOF' || fail "no CUDA device: this script needs one CUDA GPU (see the line above); on a CPU machine run python3 bench/step.py instead"
import sys

try:
    import torch
except Exception as exc:  # noqa: BLE001
    sys.exit(f"gpu_check.sh: cannot import torch: {exc}")
if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    sys.exit(f"gpu_check.sh: torch {torch.__version__} ({build}) sees no CUDA device "
             f"(torch.cuda.is_available() is False)")
print(f"gpu_check.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

OUT="${1:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT" || fail "cannot create the results directory $OUT"
started=$SECONDS
status=0

# Each part has its own time limit so that the whole script stays under 5 minutes.
echo
echo "## (a) gpu-marked tests (limit 120 s)"
timeout 120 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
[[ $tests_rc -eq 0 ]] || status=1

echo
echo "## (b) single-rank CUDA steps: uniform, exact MGDA, rep (limit 100 s)"
timeout 100 "$PYTHON" bench/step.py --single-process-only --device cuda --tasks 4 8 --steps 30 --warmup 5 \
    --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
step_rc=${PIPESTATUS[0]}
[[ $step_rc -eq 0 ]] || status=1

echo
echo "## (c) MGDA on a GPU-resident Gramian (limit 60 s)"
timeout 60 "$PYTHON" - "$OUT/solver.json" <<'EOF'
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from solvers import gramian  # noqa: E402  (bench/solvers.py's conflicting low-rank-plus-noise Gramians)

from dist_mtl.balancers import build_balancer  # noqa: E402

torch.set_num_threads(1)
device = torch.device("cuda")
balancer = build_balancer("mgda")  # never adopted, so every call is a cold solve


def timed(call, calls: int) -> float:
    """Median ms of `calls` calls, each between two synchronisations (host work included)."""
    times = []
    for _ in range(calls + 2):  # two warm-up calls
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


rows = []
for T, calls in ((40, 50), (1000, 5)):
    m_host = gramian(T, 0)  # float64 on the host
    m_cuda = m_host.to(device, torch.float32)  # as the engine's Gramian: float32 on the device
    out = balancer(m_cuda)
    rows.append(
        {
            "tasks": T,
            "calls": calls,
            "mgda_on_cuda_ms": timed(lambda m=m_cuda: balancer(m), calls),
            "copy_only_ms": timed(lambda m=m_cuda: m.to("cpu", torch.float64), calls),
            "mgda_on_host_ms": timed(lambda m=m_host: balancer(m), calls),
            "gap": out.info.get("solver_gap"),
            "coefficients_sum": float(out.coefficients.sum()),
        }
    )
    r = rows[-1]
    print(
        f"T = {T}: mgda(M on cuda) {r['mgda_on_cuda_ms']:.3f} ms, copy alone {r['copy_only_ms']:.3f} ms, "
        f"mgda(M on host) {r['mgda_on_host_ms']:.3f} ms, gap {r['gap']}"
    )
Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(device), "rows": rows}, indent=2))
EOF
solver_rc=$?
[[ $solver_rc -eq 0 ]] || status=1

echo
"$PYTHON" - "$OUT" "$tests_rc" "$step_rc" "$solver_rc" "$((SECONDS - started))" <<'EOF' | tee "$OUT/table.md"
import json
import sys
from pathlib import Path

out, tests_rc, step_rc, solver_rc, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])


def why(rc: int) -> str:
    return "timed out" if rc == 124 else f"failed (exit {rc})"


lines = ["| part | case | T | ms | ratio | result |", "|---|---|---|---|---|---|"]
log = out / "pytest.log"
summary = log.read_text().strip().splitlines()[-1] if log.exists() and log.read_text().strip() else "no output"
lines.append(f"| (a) gpu tests | `pytest -m gpu tests` | | | | {'passed' if tests_rc == 0 else why(tests_rc)}: {summary} |")

step = out / "step.json"
if step_rc == 0 and step.exists():
    report = json.loads(step.read_text())
    rows = {(r["model"], r["tasks"], r["run"]): r for r in report["rows"]}
    for model in report["meta"]["models"]:
        for t in report["meta"]["tasks"]:
            for kind, label in (("uniform", "uniform"), ("exact", "exact MGDA"), ("rep", "rep (MGDA-UB)")):
                r = rows[(model, t, f"1p {kind}")]
                ratio = r["ratios"].get("over_1p_uniform", 1.0)
                lines.append(
                    f"| (b) CUDA step | {model} (P = {r['params']:,}), {label} | {t} | {r['step_ms']:.2f} "
                    f"| {ratio:.2f}x uniform | {r['steps']} steps, median |"
                )
else:
    lines.append(f"| (b) CUDA step | bench/step.py --device cuda | | | | {why(step_rc)} |")

solver = out / "solver.json"
if solver_rc == 0 and solver.exists():
    for r in json.loads(solver.read_text())["rows"]:
        t, host = r["tasks"], r["mgda_on_host_ms"]
        gap = "n/a" if r["gap"] is None else f"{r['gap']:.1e}"
        lines.append(
            f"| (c) solver | mgda(M on cuda, float32), copy included | {t} | {r['mgda_on_cuda_ms']:.3f} "
            f"| {r['mgda_on_cuda_ms'] / host:.2f}x host M | gap {gap}, {r['calls']} calls, median |"
        )
        lines.append(f"| (c) solver | device-to-host copy alone | {t} | {r['copy_only_ms']:.3f} | | |")
        lines.append(f"| (c) solver | mgda(M on host, float64) | {t} | {host:.3f} | 1.00 | |")
else:
    lines.append(f"| (c) solver | mgda on a GPU-resident Gramian | | | | {why(solver_rc)} |")
print("\n".join(lines))
print(f"\n(total {seconds} s; results in {out})")
EOF

exit $status
