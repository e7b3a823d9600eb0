"""Aligned-MTL: TorchJD's AlignedMTLWeighting on the same Gramians, and the aligned Gramian's spectrum."""

import numpy as np
import pytest
import torch
from torchjd.aggregation import AlignedMTLWeighting

from dist_mtl.balancers.aligned_mtl import SCALE_MODES, AlignedMTL, aligned_coefficients


def gramian(kind: str, seed: int, T: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        G = rng.standard_normal((T + 10, T)) * rng.uniform(0.5, 2.0, size=T)
    elif kind == "low_rank":
        G = rng.standard_normal((30, 4)) @ rng.standard_normal((4, T))
    elif kind == "duplicated":
        G = rng.standard_normal((30, T // 2 + 1))
        G = np.concatenate([G, G[:, : T - G.shape[1]]], axis=1)
    else:
        # near_degenerate: pairs of tasks 1e-3 apart, norms over one order of magnitude, so that the
        # smallest eigenvalues are ~1e-8 of the largest. Far below that, eigenvectors carry relative
        # errors eps / lambda that no two implementations share (either may also drop a mode at T eps).
        G = rng.standard_normal((60, T // 2 + 1))
        G = np.concatenate([G, G[:, : T - G.shape[1]] + 1e-3 * rng.standard_normal((60, T - G.shape[1]))], 1)
        G = G * np.logspace(-0.5, 0.5, T)
    G = G * np.where(rng.random(T) < 0.3, -1.0, 1.0)
    return G.T @ G


@pytest.mark.parametrize("kind", ["random", "low_rank", "duplicated", "near_degenerate"])
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_equals_torchjd(kind: str, scale_mode: str) -> None:
    for seed, T in ((0, 2), (1, 5), (2, 12), (3, 40)):
        M = gramian(kind, seed, T)
        ours = AlignedMTL(scale_mode=scale_mode)(torch.tensor(M)).coefficients.numpy()
        expected = AlignedMTLWeighting(scale_mode=scale_mode)(torch.tensor(M)).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["random", "low_rank", "duplicated", "near_degenerate"])
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_the_aligned_gramian_has_condition_number_one(kind: str, scale_mode: str) -> None:
    """B M B = s P with P the projector on M's retained range: r eigenvalues s, the others 0."""
    M = gramian(kind, 4, 16)
    T = 16
    columns = [aligned_coefficients(M, e, scale_mode) for e in np.eye(T)]
    B = np.stack([c for c, *_ in columns], axis=1)
    _, rank, s, _ = columns[0]
    aligned = np.linalg.eigvalsh(B @ M @ B)
    np.testing.assert_allclose(aligned[-rank:], s, rtol=1e-6)
    assert np.all(np.abs(aligned[:-rank]) <= 1e-6 * s)
    assert rank == np.linalg.matrix_rank(M)
    np.testing.assert_allclose(B, B.T, atol=1e-9 * np.abs(B).max())
    out = AlignedMTL(scale_mode=scale_mode)(M)
    np.testing.assert_allclose(out.coefficients.numpy(), B.mean(axis=1), rtol=1e-9, atol=1e-12)
    assert out.info["aligned_mtl_rank"] == rank and out.info["aligned_mtl_scale"] == pytest.approx(s)


def test_scale_modes_and_the_lower_median() -> None:
    """Diagonal M: eigenvalues are the diagonal, and c_i = sqrt(s / lambda_i) / T."""
    lam = np.array([1.0, 4.0, 9.0, 16.0])
    expected = {"min": 1.0, "median": 4.0, "rmse": lam.mean()}  # torch.median: the lower of 4 and 9
    for mode, s in expected.items():
        c = AlignedMTL(scale_mode=mode)(np.diag(lam)).coefficients.numpy()
        np.testing.assert_allclose(c, np.sqrt(s / lam) / 4, rtol=1e-12)


def test_degenerate_gramians() -> None:
    np.testing.assert_array_equal(AlignedMTL()(np.zeros((3, 3))).coefficients.numpy(), np.full(3, 1 / 3))
    np.testing.assert_allclose(AlignedMTL()(np.array([[7.0]])).coefficients.numpy(), [1.0])
    rank_one = np.outer([1.0, -2.0, 3.0], [1.0, -2.0, 3.0])
    out = AlignedMTL()(rank_one)
    assert np.isfinite(out.coefficients.numpy()).all() and out.info["aligned_mtl_rank"] == 1.0
    M = gramian("random", 5, 8)
    base = AlignedMTL("rmse")(M).coefficients.numpy()
    for scale in (1e-12, 1e12):  # B is invariant to the scale of M
        np.testing.assert_allclose(AlignedMTL("rmse")(scale * M).coefficients.numpy(), base, rtol=1e-9)


def test_bad_scale_mode_is_named() -> None:
    with pytest.raises(ValueError, match="balancer.scale_mode must be one of min, median, rmse; got 'x'"):
        AlignedMTL(scale_mode="x")
