"""Matrix-free numerical linear algebra on curvlab operators.

Every function accepts any square operator ``op`` with ``op @ M`` for flat ``(P,)`` and
``(P, K)`` tensors plus ``.shape``, ``.dtype`` and ``.device`` -- in particular every
:class:`curvlab.operators.base.LinearOperator` (dense, composite, Hessian, GGN, ...).
Randomised routines take an explicit ``generator: torch.Generator | None``; probes are drawn
on the generator's device and moved to ``op.device`` (``None``: global RNG of ``op.device``).

* :func:`lanczos`, :func:`lanczos_tridiagonal` -- extreme eigenpairs / Lanczos decomposition
  with full reorthogonalisation (:mod:`curvlab.linalg.lanczos`).
* :func:`hutchinson_trace`, :func:`hutchinson_diagonal` -- stochastic trace and diagonal
  (:mod:`curvlab.linalg.hutchinson`).
* :func:`cg` -- conjugate gradients for ``(A + lambda I) x = b`` (:mod:`curvlab.linalg.cg`).
* :func:`spectral_density` -- stochastic Lanczos quadrature (:mod:`curvlab.linalg.slq`).

Example:
    >>> import torch
    >>> from curvlab.operators.base import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> lanczos(A, k=1, num_iter=3).eigenvalues.tolist()  # doctest: +NUMBER
    [3.0]
"""

from curvlab.linalg.cg import CGResult, cg
from curvlab.linalg.hutchinson import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
)
from curvlab.linalg.lanczos import LanczosResult, LanczosTridiagonal, lanczos, lanczos_tridiagonal
from curvlab.linalg.slq import SpectralDensity, spectral_density

__all__ = [
    "CGResult",
    "DiagonalEstimate",
    "LanczosResult",
    "LanczosTridiagonal",
    "SpectralDensity",
    "TraceEstimate",
    "cg",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "lanczos_tridiagonal",
    "spectral_density",
]
