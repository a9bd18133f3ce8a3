"""Kronecker-factored curvature (K-FAC, KFC, EKFAC, block-tridiagonal K-FAC).

The one stateful engine is :class:`KroneckerEngine` (one :class:`KroneckerBlock` per layer);
the :class:`curvlab.KFAC` operator, the K-FAC optimizer and :class:`curvlab.KFACPreconditioner`
are built on it.

Convention: a layer's parameters in homogeneous matrix form ``V = [W.reshape(out, -1) | b]``;
with curvlab's row-major vec its curvature block is approximated by ``G ⊗ A`` (the papers'
column-major ``A ⊗ G``), at the same scale as ``curvlab.GGN`` on the same data (see
:mod:`curvlab.kfac.factors`).
"""

from curvlab.kfac.blocks import Eigendecomposition, KroneckerBlock
from curvlab.kfac.capture import FactorCapture, expand_conv_input
from curvlab.kfac.ekfac import EKFACFactors, ekfac_factors, ekfac_scalings
from curvlab.kfac.engine import KroneckerEngine, LayerStatistics, register_layers
from curvlab.kfac.factors import (
    KroneckerFactors,
    accumulate_factors,
    capture_statistics,
    cross_input_factor,
    cross_output_factor,
    fisher_scale,
    input_factor,
    kfac_factors,
    output_factor,
)
from curvlab.kfac.inverse import EigenInverse, EighError, FactoredInverse, pi_tracenorm, safe_eigh
from curvlab.kfac.layers import KFACLayer, LayerTable, find_layers
from curvlab.kfac.refresh import (
    AdaptiveRefresh,
    FixedRefresh,
    FrequencyRefresh,
    RefreshPolicy,
    TraceRefresh,
)
from curvlab.kfac.tridiagonal import (
    TridiagonalFactors,
    TridiagonalInverse,
    accumulate_tridiagonal,
    tridiagonal_factors,
)

__all__ = [
    "AdaptiveRefresh",
    "EKFACFactors",
    "EigenInverse",
    "Eigendecomposition",
    "EighError",
    "FactorCapture",
    "FactoredInverse",
    "FixedRefresh",
    "FrequencyRefresh",
    "KFACLayer",
    "KroneckerBlock",
    "KroneckerEngine",
    "KroneckerFactors",
    "LayerStatistics",
    "LayerTable",
    "RefreshPolicy",
    "TraceRefresh",
    "TridiagonalFactors",
    "TridiagonalInverse",
    "accumulate_factors",
    "accumulate_tridiagonal",
    "capture_statistics",
    "cross_input_factor",
    "cross_output_factor",
    "ekfac_factors",
    "ekfac_scalings",
    "expand_conv_input",
    "find_layers",
    "fisher_scale",
    "input_factor",
    "kfac_factors",
    "output_factor",
    "pi_tracenorm",
    "register_layers",
    "safe_eigh",
    "tridiagonal_factors",
]
