"""Pure math on T x T Gramians: every balancer maps (M, losses, own state) to coefficients c, d = G c."""

from dist_mtl.balancers.aligned_mtl import AlignedMTL
from dist_mtl.balancers.base import Balancer, BalancerOutput, LossBalancer
from dist_mtl.balancers.cagrad import CAGrad
from dist_mtl.balancers.dualproj import DualProj
from dist_mtl.balancers.dwa import DWA
from dist_mtl.balancers.fairgrad import FairGrad
from dist_mtl.balancers.famo import FAMO
from dist_mtl.balancers.getmtl import GetMTL
from dist_mtl.balancers.imtl_g import IMTLG
from dist_mtl.balancers.levers import Periodic, TaskSample, with_levers
from dist_mtl.balancers.mamg import MAMG
from dist_mtl.balancers.mgda import MGDA
from dist_mtl.balancers.nash_mtl import NashMTL
from dist_mtl.balancers.pcgrad import PCGrad
from dist_mtl.balancers.registry import (
    BALANCER_NAMES,
    balancer_needs_gramian,
    balancer_options,
    build_balancer,
)
from dist_mtl.balancers.rlw import RLW
from dist_mtl.balancers.solver import MinNormInfo, min_norm
from dist_mtl.balancers.uniform import Uniform
from dist_mtl.balancers.upgrad import UPGrad
from dist_mtl.balancers.uw import UW

__all__ = [
    "BALANCER_NAMES",
    "AlignedMTL",
    "Balancer",
    "BalancerOutput",
    "CAGrad",
    "DWA",
    "DualProj",
    "FAMO",
    "FairGrad",
    "GetMTL",
    "IMTLG",
    "LossBalancer",
    "MAMG",
    "MGDA",
    "MinNormInfo",
    "NashMTL",
    "PCGrad",
    "Periodic",
    "RLW",
    "TaskSample",
    "UPGrad",
    "UW",
    "Uniform",
    "balancer_needs_gramian",
    "balancer_options",
    "build_balancer",
    "min_norm",
    "with_levers",
]
