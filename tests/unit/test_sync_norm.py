"""SyncBatchNorm2d in one process: its autograd Function is correct (gradcheck) and, split over two
ranks simulated by threads whose all-reduce sums in a fixed order, equals nn.BatchNorm2d on the
concatenated batch: output, input gradient, affine gradients (summed over ranks) and running
statistics. The same split over two gloo processes is tests/distributed/test_engine_norm.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from dist_mtl.models.norm import SyncBatchNorm2d, SyncBatchNormFunction


class ThreadSum:
    """An all-reduce (sum, in rank order) among `n` threads; counts the calls of each rank."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * n
        self.calls = [0] * n

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for s in self.slots[1:]:
                total += s
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


def _noop(t: torch.Tensor) -> None:
    pass


def test_function_passes_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.1, _noop)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def _split_run(dtype: torch.dtype, steps: int, momentum: float | None, device: str = "cpu"):
    """Per step: (reference out, dx, dw, db) of BatchNorm on the whole batch and the same from 2 ranks."""
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(4, momentum=momentum).to(device, dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ranks = [SyncBatchNorm2d(4, momentum=momentum).to(device, dtype) for _ in range(2)]
    reducer = ThreadSum(2)
    for r, layer in enumerate(ranks):
        layer.load_state_dict(ref.state_dict())
        layer.all_reduce = reducer.for_rank(r)
    results = []
    for _ in range(steps):
        x = (torch.randn(6, 4, 3, 3, dtype=dtype) * 3 + 2).to(device)
        g = torch.randn(6, 4, 3, 3, dtype=dtype).to(device)
        xr = x.clone().requires_grad_(True)
        out = ref(xr)
        out.backward(g)
        expected = (out.detach(), xr.grad, ref.weight.grad.clone(), ref.bias.grad.clone())
        ref.zero_grad()

        def rank_step(r: int, x: torch.Tensor = x, g: torch.Tensor = g):
            layer = ranks[r]
            xs = x[3 * r : 3 * (r + 1)].clone().requires_grad_(True)
            y = layer(xs)
            y.backward(g[3 * r : 3 * (r + 1)])
            grads = (layer.weight.grad.clone(), layer.bias.grad.clone())
            layer.zero_grad()
            return y.detach(), xs.grad, *grads

        with ThreadPoolExecutor(2) as pool:
            parts = list(pool.map(rank_step, range(2)))
        got = (
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            parts[0][2] + parts[1][2],
            parts[0][3] + parts[1][3],
        )
        results.append((expected, got))
    return ref, ranks, reducer, results


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_split_over_two_ranks_equals_batchnorm_on_the_concatenated_batch(dtype, tol, momentum) -> None:
    ref, ranks, reducer, results = _split_run(dtype, steps=3, momentum=momentum)
    for step, (expected, got) in enumerate(results):
        for name, e, a in zip(
            ("output", "input grad", "weight grad", "bias grad"), expected, got, strict=True
        ):
            assert torch.allclose(a, e, rtol=tol, atol=tol), f"step {step}: {name} differs"
    for layer in ranks:
        assert torch.allclose(layer.running_mean, ref.running_mean, rtol=tol, atol=tol)
        assert torch.allclose(layer.running_var, ref.running_var, rtol=tol, atol=tol)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    # Every rank holds the same statistics, bit for bit (they come from the same reduced sums).
    assert torch.equal(ranks[0].running_mean, ranks[1].running_mean)
    assert torch.equal(ranks[0].running_var, ranks[1].running_var)
    # One all-reduce per forward and one per backward pass.
    assert reducer.calls == [6, 6]


@pytest.mark.gpu
def test_split_on_cuda_equals_batchnorm() -> None:
    """The CUDA kernels (and the backward on autograd's device thread) give the same result."""
    ref, ranks, _, results = _split_run(torch.float32, steps=2, momentum=0.1, device="cuda")
    for expected, got in results:
        assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-5) for e, a in zip(expected, got, strict=True))
    assert torch.allclose(ranks[0].running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_without_all_reduce_it_is_batchnorm_and_eval_never_reduces() -> None:
    torch.manual_seed(2)
    ref, sync = nn.BatchNorm2d(3), SyncBatchNorm2d(3)
    assert list(sync.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(sync(x), ref(x))
    assert torch.equal(sync.running_var, ref.running_var)
    calls = []
    sync.all_reduce = calls.append
    sync.eval()
    ref.eval()
    assert torch.equal(sync(x), ref(x)) and not calls


def test_only_the_input_gradient_needs_the_backward_reduction() -> None:
    layer = SyncBatchNorm2d(3)
    calls = []
    layer.all_reduce = lambda t: calls.append(t.numel())
    layer(torch.randn(4, 3, 2, 2)).sum().backward()  # input needs no gradient: no backward reduction
    assert calls == [7]
