"""Second-order and baseline optimizers with one step interface.

Every optimizer: ``opt = Opt(model, loss_fn, **hyper)``; ``loss = opt.step(inputs, targets)``
does the whole step and returns the mini-batch loss before the update (0-dim, detached);
``opt.counters`` counts forwards, backwards, Jacobian products, steps and skipped steps;
``state_dict()`` / ``load_state_dict()`` resume bit-exactly.
"""

from curvlab.optim.baselines import TorchOptimizer
from curvlab.optim.curveball import CurveBall, ResidualModel
from curvlab.optim.dense import DenseBFGS, DenseLevenbergMarquardt
from curvlab.optim.hessian_free import HessianFree
from curvlab.optim.kfac import KFAC
from curvlab.optim.ngd import NaturalGradient
from curvlab.optim.preconditioner import KFACPreconditioner

__all__ = [
    "KFAC",
    "CurveBall",
    "DenseBFGS",
    "DenseLevenbergMarquardt",
    "HessianFree",
    "KFACPreconditioner",
    "NaturalGradient",
    "ResidualModel",
    "TorchOptimizer",
]
