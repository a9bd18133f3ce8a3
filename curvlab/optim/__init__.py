"""Second-order and baseline optimizers with one step interface.

Every optimizer: ``opt = Opt(model, loss_fn, **hyper)``; ``loss = opt.step(inputs, targets)``
does the whole step and returns the mini-batch loss before the update (0-dim, detached);
``opt.counters`` counts forwards, backwards, Jacobian products, steps and skipped steps;
``state_dict()`` / ``load_state_dict()`` resume bit-exactly.
"""

from curvlab.optim.base import CurvatureOptimizer, SkipStep
from curvlab.optim.baselines import TorchOptimizer
from curvlab.optim.curveball import CurveBall
from curvlab.optim.dense import DenseBFGS, DenseLevenbergMarquardt
from curvlab.optim.hessian_free import HessianFree
from curvlab.optim.kfac import KFACOptimizer
from curvlab.optim.ngd import NaturalGradient
from curvlab.optim.preconditioner import KFACPreconditioner
from curvlab.optim.residual import ResidualModel

__all__ = [
    "CurvatureOptimizer",
    "CurveBall",
    "DenseBFGS",
    "DenseLevenbergMarquardt",
    "HessianFree",
    "KFACOptimizer",
    "KFACPreconditioner",
    "NaturalGradient",
    "ResidualModel",
    "SkipStep",
    "TorchOptimizer",
]


_RENAMED = {"KFAC": "KFACOptimizer"}


def __getattr__(name: str):
    """Old names keep working for one release, with a ``DeprecationWarning``."""
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(f"curvlab.optim.{name} is deprecated, use curvlab.optim.{new} (the name "
                      f"curvlab.KFAC is the operator)", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'curvlab.optim' has no attribute {name!r}")
