"""Matrix-free linear operators: the algebra base and the data-set curvature matrices.

* :mod:`curvlab.operators.base` -- :class:`LinearOperator` (``@`` on flat/matrix/list/dict,
  ``+``, ``-``, scalar ``*``, ``.T``, ``to_dense``, ``to_scipy``); it re-exports the pieces
  that live in :mod:`~curvlab.operators.flat` (:func:`flatten_params`, :func:`unflatten`),
  :mod:`~curvlab.operators.forms` (input forms), :mod:`~curvlab.operators.composite` (sum,
  scaled, product, adjoint), :mod:`~curvlab.operators.explicit` (identity, dense) and
  :mod:`~curvlab.operators.scipy_export`.
* :class:`Hessian`, :class:`GGN`, :class:`Fisher` (Monte-Carlo), :class:`EmpiricalFisher` --
  curvature of a loss over a data set (:mod:`curvlab.operators.curvature` for data handling and
  the mean/sum convention).
* :class:`LocalGGN` -- the GGN of one mini-batch at the current point, built on one forward
  (:mod:`curvlab.operators.local`): the products GGN-based optimizers need.
"""

# base first: it imports the composite/explicit operators after defining LinearOperator.
from curvlab.operators.base import (
    AdjointOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
    flatten_params,
    unflatten,
)
from curvlab.operators.curvature import CurvatureOperator
from curvlab.operators.fisher import EmpiricalFisher, Fisher
from curvlab.operators.ggn import GGN
from curvlab.operators.hessian import Hessian
from curvlab.operators.local import LocalGGN

__all__ = [
    "GGN",
    "AdjointOperator",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisher",
    "Fisher",
    "Hessian",
    "IdentityOperator",
    "LinearOperator",
    "LocalGGN",
    "ProductOperator",
    "ScaledOperator",
    "SumOperator",
    "flatten_params",
    "unflatten",
]
