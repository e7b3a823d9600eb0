"""Lossy exchanges: approximate weights from a compressed Gramian, exact gradients in the direction.

For MGDA without normalisation (c = a, the min-norm point of the simplex), let M be the exact Gramian,
M^ the one the coordinator forms from compressed payloads and E = M^ - M. Because a -> a^T M a is
lambda_min(M)-strongly convex on the simplex and a* is optimal (first-order condition), for any a:
a^T M a - a*^T M a* >= lambda_min ||a - a*||^2. With a = a^ (optimal for M^, so a^T M^ a^ <= a*^T M^ a*):
lambda_min ||D||^2 <= (a* - a^)^T E (a* + a^) <= ||D|| ||E||_2 ||a* + a^||_2 <= 2 ||D|| ||E||_2, so

    ||c^ - c||_2 <= 2 ||E||_2 / lambda_min(M).                                        (1)

||E|| itself has an a-priori bound per codec. With g^_t = g_t + e_t,
|E_st| <= ||e_s|| ||g_t|| + ||g_s|| ||e_t|| + ||e_s|| ||e_t||, where
- fp16 / bf16 (and the `gramian` protocol's engine.wire_dtype=bfloat16, whose all-to-all rounds the
  shards to bfloat16): ||e_t|| <= u ||g_t|| + h sqrt(P), u the unit roundoff (2^-11, 2^-8), h half
  the smallest subnormal spacing (2^-25 for fp16, 0 for bf16, whose range is float32's);
- top-k of P: the dropped tail has ||e_t||^2 <= (1 - k/P) ||g_t||^2 (the kept k coordinates carry at
  least their share k/P of the energy);
- count-sketch of width m with bucket h and sign s: E_st = sum_{p != q, h(p) = h(q)} s_p s_q g_sp g_tq,
  so E[E_st] = 0 and, exactly,
      sigma_st^2 = Var E_st = (M_ss M_tt + M_st^2 - 2 sum_p g_sp^2 g_tp^2) / m  <=  2 ||g_s||^2 ||g_t||^2 / m.
  Each entry must lie within Z_ENTRY = 4 sigma_st, and ||E||_F within Z_FRO = 3 times its root mean
  square sqrt(sum_st sigma_st^2) (Chebyshev: a correct sketch fails that with probability <= 1/9; the
  seeds are fixed, and measured errors are 0.6-1.3 rms and <= 2.4 sigma per entry over six seeds).
  Beside this statistical bound the sketch is checked exactly: the Gramian the coordinator solved is
  (S G)(S G)^T with S (m x P) rebuilt here from the seed, independently of the codec.
The test checks both bounds, that the coordinator's weights are the exact solve on the compressed
Gramian, and that the applied direction is c^ times the exact task gradients (DESIGN section 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dist_mtl.build import build_balancer_for, build_datasets, build_model_for
from dist_mtl.config import RunConfig, load_config
from dist_mtl.data.memory import batch_indices
from dist_mtl.engine.codecs import build_codec
from dist_mtl.gradients import task_losses
from tests.distributed.harness import BASE, load, read_jsonl, run_worker, sketch_matrix

pytestmark = [pytest.mark.distributed]

LR = 0.5
CODECS = {
    "fp16": ["engine.protocol=gather", "engine.compression=fp16"],
    "bf16": ["engine.protocol=gather", "engine.compression=bf16"],
    # gather's rows sent as each backward ends (the default) and, here, in one gather after the last
    "bf16-at-once": ["engine.protocol=gather", "engine.compression=bf16", "engine.overlap=false"],
    "topk": ["engine.protocol=gather", "engine.compression=topk", "engine.topk_ratio=0.25"],
    "countsketch": ["engine.protocol=gather", "engine.compression=countsketch", "engine.sketch_size=512"],
    "sketch": ["engine.protocol=sketch", "engine.sketch_size=512"],
    # the gramian protocol's bfloat16 wire, overlapped (the default) and in one all-to-all
    "wire-bf16": ["engine.protocol=gramian", "engine.wire_dtype=bfloat16"],
    "wire-bf16-at-once": ["engine.protocol=gramian", "engine.wire_dtype=bfloat16", "engine.overlap=false"],
}
WIRES = ("wire-bf16", "wire-bf16-at-once")
COMMON = [
    "engine.replicas=1",
    "engine.task_parallel=2",
    "balancer.name=mgda",
    "balancer.normalization=none",
    "optim.name=sgd",
    "optim.momentum=0",
    f"optim.lr={LR}",
    "train.steps=1",
]
Z_ENTRY, Z_FRO = 4.0, 3.0
SKETCHES = ("countsketch", "sketch")


def overrides(name: str, run_dir: Path) -> list[str]:
    return [*BASE, *COMMON, *CODECS[name], f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def lossy_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lossy")
    run_worker(
        2, {"cases": [{"overrides": overrides(name, out / name)} for name in CODECS]}, out / "spec.json"
    )
    return out


def first_step(cfg: RunConfig) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The initial model, the exact task gradients G (T x P), the heads' gradients and the losses."""
    train_set, _ = build_datasets(cfg)
    model = build_model_for(cfg, train_set)
    idx = batch_indices(len(train_set), cfg.data.batch_size, cfg.seed, 0)
    losses = task_losses(model(train_set.x[idx]), train_set.y[idx])
    shared = model.shared_parameters()
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    heads = [p for t in range(model.num_tasks) for p in model.head_parameters(t)]
    head_grads = torch.autograd.grad(losses.sum(), heads)
    return model, torch.stack(rows), list(head_grads), losses.detach()


def sketch_variance(grads: torch.Tensor, m: int) -> torch.Tensor:
    """sigma_st^2 = Var(M^_st) of a count-sketch of width m, exactly (module docstring)."""
    g = grads.double()
    gramian, squares = g @ g.T, g.square()
    diag = gramian.diagonal()
    return (torch.outer(diag, diag) + gramian.square() - 2 * squares @ squares.T) / m


def error_bound(name: str, grads: torch.Tensor, gramian: torch.Tensor, cfg: RunConfig) -> float:
    """The a-priori bound on ||M^ - M||_F of the module docstring."""
    params = grads.shape[1]
    norms = grads.double().norm(dim=1)
    if name in SKETCHES:
        return Z_FRO * math.sqrt(float(sketch_variance(grads, cfg.engine.sketch_size).sum()))
    if name == "topk":
        keep = math.ceil(cfg.engine.topk_ratio * params)
        e = math.sqrt(1 - keep / params) * norms
    else:
        u, h = (2.0**-11, 2.0**-25) if name == "fp16" else (2.0**-8, 0.0)  # bf16 and the bf16 wires
        e = u * norms + h * math.sqrt(params)
    entry = torch.outer(e, norms) + torch.outer(norms, e) + torch.outer(e, e)
    return float(entry.norm())


def compressed_gramian(name: str, grads: torch.Tensor, losses: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """M^ as the codec forms it from the rows [g_t | L_t]; for the sketches also checked against
    (S G)(S G)^T computed independently of the codec."""
    if name in WIRES:  # the shards rounded to bfloat16, their Gramian formed in float32
        rounded = grads.bfloat16().double()
        return rounded @ rounded.T
    e = cfg.engine
    codec = build_codec(
        "countsketch" if name == "sketch" else e.compression,
        params=grads.shape[1],
        topk_ratio=e.topk_ratio,
        sketch_size=e.sketch_size,
        sketch_seed=e.sketch_seed,
        device=grads.device,
    )
    rows = torch.cat([grads, losses.float()[:, None]], dim=1)
    gramian, got_losses = codec.gramian(codec.encode(rows))
    assert torch.equal(got_losses, losses.float())
    if name in SKETCHES:
        sketched = grads.double() @ sketch_matrix(grads.shape[1], e.sketch_size, e.sketch_seed).T
        independent = sketched @ sketched.T
        scale = float(independent.diagonal().max())
        assert torch.allclose(gramian.double(), independent, rtol=1e-5, atol=1e-6 * scale)
        return independent
    return gramian.double()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CODECS))
def test_lossy_weights_within_derived_bound_and_direction_from_exact_gradients(name, lossy_runs) -> None:
    run_dir = lossy_runs / name
    cfg = load_config(None, overrides(name, run_dir))
    model, grads, head_grads, losses = first_step(cfg)
    exact = grads.double() @ grads.double().T
    balancer = build_balancer_for(cfg)
    c_exact = balancer(exact, losses.double()).coefficients
    (record,) = [r for r in read_jsonl(run_dir / "metrics" / "rank0.jsonl") if "weight/task_0" in r]
    c_hat = torch.tensor([record[f"weight/task_{t}"] for t in range(model.num_tasks)], dtype=torch.float64)
    approx = compressed_gramian(name, grads, losses, cfg)
    err = approx - exact
    lam = float(torch.linalg.eigvalsh(exact)[0])
    coefficient_error = float((c_hat - c_exact).norm())
    coefficient_bound = 2 * float(torch.linalg.matrix_norm(err, ord=2)) / lam + 1e-6
    gramian_error, gramian_bound = float(err.norm()), error_bound(name, grads, exact, cfg)
    print(
        f"\n{name}: ||c^ - c|| = {coefficient_error:.3g} (bound (1): {coefficient_bound:.3g}); "
        f"||M^ - M||_F / ||M||_F = {gramian_error / float(exact.norm()):.3g} "
        f"(a-priori bound {gramian_bound / float(exact.norm()):.3g})"
    )
    assert gramian_error <= gramian_bound
    if name in SKETCHES:
        sigma = sketch_variance(grads, cfg.engine.sketch_size).sqrt()
        z = float((err.abs() / sigma).max())
        print(f"{name}: largest |M^_st - M_st| / sigma_st = {z:.2f} (bound {Z_ENTRY})")
        assert z <= Z_ENTRY
    assert coefficient_error <= coefficient_bound
    # The coordinator solved exactly the Gramian this codec defines ...
    c_on_approx = balancer(approx, losses.double()).coefficients
    assert torch.allclose(c_hat, c_on_approx, rtol=1e-4, atol=1e-5), (c_hat, c_on_approx)
    # ... and every rank applied d = G c^ with the exact gradients, heads with their own gradients.
    after = load(run_dir / "checkpoints" / "last.pt")["model"]
    direction = c_hat.float() @ grads
    expected_shared = torch.cat([p.detach().reshape(-1) for p in model.shared_parameters()]) - LR * direction
    got_shared = torch.cat([after[f"encoder.{n}"].reshape(-1) for n, _ in model.encoder.named_parameters()])
    assert torch.allclose(got_shared, expected_shared, rtol=1e-5, atol=1e-6)
    heads = [
        (f"heads.{t}.{n}", p) for t in range(model.num_tasks) for n, p in model.heads[t].named_parameters()
    ]
    for (key, p), g in zip(heads, head_grads, strict=True):
        assert torch.allclose(after[key], p.detach() - LR * g, rtol=1e-5, atol=1e-6), key
