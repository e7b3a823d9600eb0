"""The registry and the common balancer contract: names, options, errors, output types, state."""

import numpy as np
import pytest
import torch

from dist_mtl.balancers import BALANCER_NAMES, Balancer, BalancerOutput, balancer_options, build_balancer


def gramian(T: int = 6) -> torch.Tensor:
    G = np.random.default_rng(0).standard_normal((10, T))
    G[:, 0] *= -1.0
    return torch.tensor(G.T @ G, dtype=torch.float32)


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_every_balancer_honours_the_output_contract(name: str) -> None:
    balancer = build_balancer(name)
    assert isinstance(balancer, Balancer) and balancer.name == name
    out = balancer(gramian(), torch.rand(6) + 0.1)
    assert isinstance(out, BalancerOutput)
    c = out.coefficients
    assert c.dtype == torch.float64 and c.device.type == "cpu" and c.shape == (6,)
    assert torch.isfinite(c).all()
    assert all(isinstance(v, float) for v in out.info.values())
    state = balancer.state_dict()
    build_balancer(name).load_state_dict(state)


DEGENERATE = {
    "single": np.array([[2.0]]),
    "zero": np.zeros((3, 3)),
    "identical": np.ones((4, 4)),
    "opposite_huge": np.array([[1e300, -1e300], [-1e300, 4e300]]),
    "opposite_tiny": np.array([[1e-300, -1e-300], [-1e-300, 4e-300]]),
    "spread_scales": np.diag([1e-300, 1.0, 1e300]),
    "rank_one": np.outer([1.0, -2.0, 3.0, -0.5], [1.0, -2.0, 3.0, -0.5]),
}


@pytest.mark.parametrize("name", BALANCER_NAMES)
@pytest.mark.parametrize("case", DEGENERATE)
def test_finite_gramians_never_give_nan(name: str, case: str) -> None:
    M = DEGENERATE[case]
    out = build_balancer(name)(M, torch.ones(M.shape[0]))
    assert torch.isfinite(out.coefficients).all()
    assert all(np.isfinite(v) for v in out.info.values())


def test_uniform_is_one_over_t() -> None:
    np.testing.assert_array_equal(build_balancer("uniform")(gramian(4)).coefficients.numpy(), 0.25)


def test_names_and_options() -> None:
    assert BALANCER_NAMES[:4] == ("uniform", "mgda", "getmtl", "mamg")
    assert {"famo", "uw", "dwa", "rlw"} <= set(BALANCER_NAMES)
    assert balancer_options("famo") == ("famo_lr", "famo_gamma")
    assert balancer_options("uw") == ("uw_lr",)
    assert balancer_options("dwa") == ("temperature",)
    assert balancer_options("rlw") == ("seed",)
    assert balancer_options("mgda") == ("normalization", "apply", "tol", "max_iter")
    assert balancer_options("getmtl") == ("eps", "tol", "max_iter", "max_scale")
    assert balancer_options("mamg") == ("seed",)
    assert balancer_options("uniform") == ()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("foo", {}, "balancer.name must be one of uniform, mgda, getmtl, mamg, "),
        (
            "mgda",
            {"normalization": "foo"},
            "balancer.normalization must be one of none, l2, loss, loss+; got 'foo'",
        ),
        ("mgda", {"apply": "raw"}, "balancer.apply must be one of adopted, official; got 'raw'"),
        ("mgda", {"eps": 0.1}, "balancer 'mgda' does not take option(s) eps; valid options: normalization"),
        ("uniform", {"seed": 1}, "balancer 'uniform' does not take option(s) seed; valid options: (none)"),
        ("getmtl", {"eps": 2.0}, "balancer.eps must be in (0, 1]; got 2.0"),
        ("getmtl", {"max_scale": 1.0}, "balancer.max_scale must be a finite number > 1; got 1.0"),
        ("getmtl", {"max_iter": 1.5}, "balancer.max_iter must be an integer >= 1; got 1.5"),
        ("mamg", {"seed": "a"}, "balancer.seed must be an integer >= 0; got 'a'"),
        ("famo", {"famo_lr": 0.0}, "balancer.famo_lr must be a finite number in (0, inf); got 0.0"),
        ("famo", {"famo_gamma": -1.0}, "balancer.famo_gamma must be a finite number in [0, inf); got -1.0"),
        ("uw", {"uw_lr": float("nan")}, "balancer.uw_lr must be a finite number in (0, inf); got nan"),
        ("dwa", {"temperature": -2}, "balancer.temperature must be a finite number in (0, inf); got -2"),
        ("rlw", {"seed": -1}, "balancer.seed must be an integer >= 0; got -1"),
    ],
)
def test_bad_options_raise_errors_that_say_what_is_valid(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_balancer(name, **options)
    assert message in str(err.value)


def test_stateless_balancers_reject_foreign_state() -> None:
    with pytest.raises(ValueError, match="stateless"):
        build_balancer("uniform").load_state_dict({"step": 3})


def test_non_finite_gramian_is_rejected() -> None:
    M = gramian()
    M[1, 2] = float("inf")
    with pytest.raises(ValueError, match="M must be finite"):
        build_balancer("uniform")(M)
