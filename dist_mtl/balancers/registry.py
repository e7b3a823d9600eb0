"""Balancers by name, with their options checked up front (a typo fails at build time, not mid-run)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dist_mtl.balancers.aligned_mtl import AlignedMTL
from dist_mtl.balancers.base import Balancer, LossBalancer
from dist_mtl.balancers.cagrad import CAGrad
from dist_mtl.balancers.dualproj import DualProj
from dist_mtl.balancers.dwa import DWA
from dist_mtl.balancers.fairgrad import FairGrad
from dist_mtl.balancers.famo import FAMO
from dist_mtl.balancers.getmtl import GetMTL
from dist_mtl.balancers.imtl_g import IMTLG
from dist_mtl.balancers.mamg import MAMG
from dist_mtl.balancers.mgda import MGDA
from dist_mtl.balancers.nash_mtl import NashMTL
from dist_mtl.balancers.pcgrad import PCGrad
from dist_mtl.balancers.rlw import RLW
from dist_mtl.balancers.uniform import Uniform
from dist_mtl.balancers.upgrad import UPGrad
from dist_mtl.balancers.uw import UW

_REGISTRY: dict[str, type[Balancer]] = {
    "uniform": Uniform,
    "mgda": MGDA,
    "getmtl": GetMTL,
    "mamg": MAMG,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "fairgrad": FairGrad,
    "nash_mtl": NashMTL,
    # Loss-based balancers (no Gramian: one backward of sum_t c_t L_t per step).
    "famo": FAMO,
    "uw": UW,
    "dwa": DWA,
    "rlw": RLW,
}
BALANCER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def balancer_options(name: str) -> tuple[str, ...]:
    """The keyword options `build_balancer(name, ...)` accepts."""
    return tuple(f.name for f in fields(_balancer_class(name)) if f.init)


def build_balancer(name: str, **options: Any) -> Balancer:
    """A balancer by registry name; unknown names, unknown options and invalid values raise ValueError."""
    cls = _balancer_class(name)
    valid = balancer_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"balancer {name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    return cls(**options)


def balancer_needs_gramian(name: str) -> bool:
    """Whether balancer `name` reads the Gramian (False for a `LossBalancer`: a function of the losses
    and its own state), known from the class, before any balancer is built."""
    return not issubclass(_balancer_class(name), LossBalancer)


def _balancer_class(name: str) -> type[Balancer]:
    if name not in _REGISTRY:
        raise ValueError(f"balancer.name must be one of {', '.join(BALANCER_NAMES)}; got {name!r}")
    return _REGISTRY[name]
