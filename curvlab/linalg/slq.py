"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps from ``v`` give a tridiagonal ``T = S diag(theta)
S^T``; the Gauss quadrature rule with nodes ``theta_i`` and weights ``tau_i = S[0, i]^2`` (the
squared *first components* of the eigenvectors, which sum to one) approximates the measure
``v^T delta(t - A) v``. Averaging over random probes estimates the spectral density
``rho(t) = (1/P) sum_j delta(t - lambda_j)``, which is then smoothed with a Gaussian kernel of
width ``sigma`` (Ghorbani, Krishnan & Xiao 2019; Papyan 2018).

Exact identities useful for checks: the weighted mean of the nodes of one probe is
``v^T A v`` (``= alpha_0``), so the density's mean is a Hutchinson estimate of ``tr(A) / P``,
exact for diagonal ``A`` with Rademacher probes.

The operator needs ``op @ M`` for ``M`` of shape ``(P, K)``, ``.shape``, ``.dtype`` and
``.device``; it must be symmetric (operators declaring ``symmetric=False`` are rejected).
Randomness: ``generator`` draws the probes on its own device (then moved to ``op.device``);
``None`` uses the global RNG of ``op.device``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvlab.linalg._utils import (
    check_distribution,
    check_generator,
    check_int,
    check_operator,
    check_real,
    check_symmetric,
    sample_probes,
)
from curvlab.linalg.lanczos import _run

__all__ = ["SpectralDensity", "spectral_density"]


class SpectralDensity(NamedTuple):
    """Output of :func:`spectral_density` (all tensors float64 on the CPU).

    Attributes:
        grid: ``(G,)`` evaluation points.
        density: ``(G,)`` smoothed density at ``grid`` (integrates to ~1 over a grid that
            covers the nodes with a margin of a few ``sigma``).
        nodes: ``(N,)`` quadrature nodes (Ritz values) of all probes, concatenated.
        weights: ``(N,)`` matching weights, each probe's ``S[0, :]^2`` divided by the number
            of probes, so ``weights.sum() == 1``.
        sigma: The Gaussian kernel width used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float


def spectral_density(
    op: Any,
    num_probes: int = 8,
    num_iter: int = 50,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> SpectralDensity:
    """Estimate the smoothed eigenvalue density of a symmetric operator by SLQ.

    Each probe runs ``min(num_iter, P)`` Lanczos steps with full reorthogonalisation (fewer if
    the Krylov space becomes invariant, in which case the quadrature is exact for that probe).

    Args:
        op: Symmetric operator ``(P, P)``.
        num_probes: Number of random start vectors (``>= 1``).
        num_iter: Lanczos steps per probe (``>= 1``; capped at ``P``).
        grid: Either the number of evaluation points (``>= 2``) of an automatic uniform grid
            spanning ``[min(nodes) - 5 sigma, max(nodes) + 5 sigma]``, or an explicit 1-D
            tensor of points (copied to float64 on the CPU).
        sigma: Kernel width ``> 0``; default ``0.02 * (max(nodes) - min(nodes))`` (or
            ``0.02 * max(1, |nodes|)`` if all nodes coincide).
        generator: Random source for the probes (see the module docstring).
        distribution: Probe entries, ``"rademacher"`` or ``"gaussian"`` (normalised to unit
            norm either way).

    Returns:
        :class:`SpectralDensity` ``(grid, density, nodes, weights, sigma)``.

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or declares ``symmetric=False``, or an argument is
            out of range.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
        >>> out = spectral_density(A, num_probes=2, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.trapezoid(out.density, out.grid)), 3)
        1.0
        >>> round(float((out.weights * out.nodes).sum()), 8)  # = tr(A) / P for diagonal A
        2.5
    """
    p = check_operator(op)
    check_symmetric(op, "op", "spectral_density")
    num_probes = check_int(num_probes, "num_probes", 1)
    num_iter = min(check_int(num_iter, "num_iter", 1), p)
    generator = check_generator(generator)
    distribution = check_distribution(distribution)
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 1:
            raise ValueError(
                f"grid tensor must be 1-D and non-empty, got shape {tuple(grid.shape)}"
            )
        if not grid.dtype.is_floating_point:
            raise TypeError(f"grid tensor must be floating point, got {grid.dtype}")
        if not bool(torch.isfinite(grid).all()):
            raise ValueError("grid must contain only finite values")
        num_points = None
    else:
        num_points = check_int(grid, "grid", 2)
    if sigma is not None:
        sigma = check_real(sigma, "sigma", positive=True)

    node_list: list[Tensor] = []
    weight_list: list[Tensor] = []
    for _ in range(num_probes):
        v0 = sample_probes(p, 1, distribution, op.dtype, op.device, generator)[:, 0]
        alphas, betas, _basis = _run(op, p, num_iter, v0, generator, restart=False)
        a = torch.tensor(alphas, dtype=torch.float64)
        b = torch.tensor(betas, dtype=torch.float64)
        t = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, s = torch.linalg.eigh(t)
        node_list.append(theta)
        weight_list.append(s[0, :] ** 2 / num_probes)
    nodes = torch.cat(node_list)
    weights = torch.cat(weight_list)

    lo, hi = nodes.min().item(), nodes.max().item()
    if sigma is None:
        width = hi - lo
        sigma = 0.02 * (width if width > 0 else max(1.0, abs(hi), abs(lo)))
    if num_points is not None:
        points = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    else:
        assert isinstance(grid, Tensor)
        points = grid.detach().to(device="cpu", dtype=torch.float64).clone()
    density = torch.zeros_like(points)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    chunk = max(1, 2**20 // max(1, nodes.numel()))
    for start in range(0, points.numel(), chunk):
        g = points[start : start + chunk, None]
        kernel = torch.exp(-0.5 * ((g - nodes[None, :]) / sigma) ** 2)
        density[start : start + chunk] = norm * (kernel @ weights)
    return SpectralDensity(points, density, nodes, weights, sigma)
