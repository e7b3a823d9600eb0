"""Pure math on T x T Gramians: every balancer maps (M, losses, own state) to coefficients c, d = G c."""

from dist_mtl.balancers.base import Balancer, BalancerOutput
from dist_mtl.balancers.getmtl import GetMTL
from dist_mtl.balancers.mamg import MAMG
from dist_mtl.balancers.mgda import MGDA
from dist_mtl.balancers.registry import BALANCER_NAMES, balancer_options, build_balancer
from dist_mtl.balancers.solver import MinNormInfo, min_norm
from dist_mtl.balancers.uniform import Uniform

__all__ = [
    "BALANCER_NAMES",
    "Balancer",
    "BalancerOutput",
    "GetMTL",
    "MAMG",
    "MGDA",
    "MinNormInfo",
    "Uniform",
    "balancer_options",
    "build_balancer",
    "min_norm",
]
