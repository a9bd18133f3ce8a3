"""curvlab: matrix-free curvature and second-order optimization on ``torch.func``.

Layers (each imports only from those before it):

* :mod:`curvlab.func` -- pure functions: loss-Hessian rules, the model linearization, and the
  Hessian / GGN / Fisher / empirical-Fisher products on one batch.
* :mod:`curvlab.kfac` -- Kronecker factors: capture hooks, factors, inverses, EKFAC, tridiagonal.
* :mod:`curvlab.operators` -- linear operators over a batch or a data set: :class:`Hessian`,
  :class:`GGN`, :class:`Fisher`, :class:`EmpiricalFisher`, :class:`KFAC`.
* :mod:`curvlab.linalg` -- Lanczos, Hutchinson, CG and spectral densities on any operator.
* :mod:`curvlab.optim` -- CurveBall, K-FAC, Hessian-free, natural gradient, baselines.
* :mod:`curvlab.data`, :mod:`curvlab.problems` -- offline data sets and test problems.
* :mod:`curvlab.experiments` (imported on demand: it needs pandas/matplotlib) -- the documented
  experiments behind ``python -m curvlab reproduce``.

Example:
    >>> import torch, curvlab
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> G = curvlab.GGN(net, torch.nn.CrossEntropyLoss(), data)
    >>> G.shape
    (67, 67)
    >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-6)   # the GGN is PSD
    True
"""

from curvlab import data, func, kfac, linalg, operators, optim, problems
from curvlab.operators import GGN, EmpiricalFisher, Fisher, Hessian, LinearOperator
from curvlab.operators.kfac import KFAC
from curvlab.optim.preconditioner import KFACPreconditioner

__version__ = "0.1.0"

__all__ = [
    "GGN",
    "KFAC",
    "EmpiricalFisher",
    "Fisher",
    "Hessian",
    "KFACPreconditioner",
    "LinearOperator",
    "data",
    "func",
    "kfac",
    "linalg",
    "operators",
    "optim",
    "problems",
]
