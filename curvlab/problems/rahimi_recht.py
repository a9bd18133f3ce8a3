"""The degenerate two-layer linear network of Rahimi & Recht (NIPS 2017 "test of time" talk).

Data: ``N = 1000`` inputs ``x ~ N(0, I)``, an ill-conditioned matrix
``A = diag(linspace(1, 1e-5, 10)) · U[0,1]^{10 × d_x}`` (row ``i`` of a uniform random matrix
scaled by the ``i``-th of 10 values evenly spaced from 1 down to ``degeneracy = 1e-5``), targets
``y = A x`` without noise. Model: a product of two bias-free matrices. Two variants:

``"curveball"`` (the CurveBall authors' toy code, ``albanie/mcnToyOptim``)
    ``x ∈ R^6``, ``ŷ = W2 W1 x`` with ``W1 ∈ R^{10×6}`` initialised ``0.125 · N(0,1)``
    (``2 / (10 + 6)``) and ``W2 ∈ R^{10×10}`` initialised ``0.1 · N(0,1)``; loss
    ``(1/N) Σ_i ||ŷ_i - y_i||²`` (CurveBall ``'ls'``, no ½); CurveBall used λ = 1, η = 1, full
    batch, 1000 iterations, tolerance 1e-4.

``"recht"`` (Recht's notebook ``shallow-linear-net/TwoLayerLinearNets.ipynb``)
    ``x ∈ R^10``, ``Ŷ = W1 W2 X`` with ``W2 ∈ R^{6×10}`` and ``W1 ∈ R^{10×6}``, both
    initialised ``N(0,1)``; loss = plain sum of squares ``Σ_i ||ŷ_i - y_i||²``.

The model is an ``nn.Sequential`` of two bias-free ``nn.Linear`` layers (the first layer applied to
``x`` comes first), so ``model[1].weight @ model[0].weight`` is the end-to-end matrix. All draws
come from one CPU ``torch.Generator`` in float64 (order: ``x``, ``A``, first-layer weight,
second-layer weight) and are then cast, so the problem is identical across devices and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from curvlab.problems.losses import sum_of_squares_loss

__all__ = ["RAHIMI_RECHT_TOLERANCE", "RahimiRechtProblem", "make_rahimi_recht"]

#: Loss tolerance used by the CurveBall toy experiments.
RAHIMI_RECHT_TOLERANCE = 1e-4

# variant -> (x_dim, hidden, y_dim, std of first-layer init, std of second-layer init, reduction)
_VARIANTS: dict[str, tuple[int, int, int, float, float, str]] = {
    "curveball": (6, 10, 10, 2.0 / (10 + 6), 0.1, "mean"),
    "recht": (10, 6, 10, 1.0, 1.0, "sum"),
}


@dataclass
class RahimiRechtProblem:
    """Model, data and loss of a Rahimi–Recht problem (see the module docstring).

    Attributes:
        variant: ``"curveball"`` or ``"recht"``.
        model: ``nn.Sequential(Linear(d_x, h, bias=False), Linear(h, d_y, bias=False))``.
        x: Inputs ``(N, d_x)``.
        y: Targets ``(N, d_y) = x A^T``.
        A: The ``(d_y, d_x)`` data matrix.
        row_scales: ``linspace(1, degeneracy, d_y)``, the scale of each row of ``A``.
        loss_fn: ``loss_fn(output, target)``: mean (curveball) or sum (recht) of per-example
            squared errors.
        tolerance: Convergence tolerance on the loss (1e-4).
    """

    variant: str
    model: nn.Sequential
    x: Tensor
    y: Tensor
    A: Tensor
    row_scales: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    tolerance: float = RAHIMI_RECHT_TOLERANCE

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        """The full batch ``(x, y)``."""
        return self.x, self.y

    def loss(self) -> Tensor:
        """Full-batch loss at the model's current weights."""
        return self.loss_fn(self.model(self.x), self.y)

    def end_to_end(self) -> Tensor:
        """The product matrix the network computes, ``(d_y, d_x)``."""
        return self.model[1].weight @ self.model[0].weight


def make_rahimi_recht(
    variant: Literal["curveball", "recht"] = "curveball",
    *,
    num_samples: int = 1000,
    degeneracy: float = 1e-5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> RahimiRechtProblem:
    """Build a seeded Rahimi–Recht problem.

    Args:
        variant: ``"curveball"`` (6 → 10 → 10, mean loss) or ``"recht"`` (10 → 6 → 10, sum).
        num_samples: Number of data points ``N`` (1000 in both sources).
        degeneracy: Smallest row scale of ``A`` (``1e-5``, the "level of degeneracy").
        seed: Seed of the CPU generator for data and weights.
        dtype: Floating dtype (default float64).
        device: Device of the data and the model.

    Example:
        >>> prob = make_rahimi_recht("curveball", seed=0)
        >>> prob.x.shape, prob.y.shape, prob.model[0].weight.shape, prob.model[1].weight.shape
        (torch.Size([1000, 6]), torch.Size([1000, 10]), torch.Size([10, 6]), torch.Size([10, 10]))
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(degeneracy, int | float) or not 0 < degeneracy <= 1:
        raise ValueError(f"degeneracy must be a number in (0, 1], got {degeneracy!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    x_dim, hidden, y_dim, std1, std2, reduction = _VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    x = torch.randn(num_samples, x_dim, generator=gen, dtype=f64)
    scales = torch.linspace(1.0, degeneracy, y_dim, dtype=f64)
    A = scales[:, None] * torch.rand(y_dim, x_dim, generator=gen, dtype=f64)
    y = x @ A.T
    w_first = std1 * torch.randn(hidden, x_dim, generator=gen, dtype=f64)
    w_second = std2 * torch.randn(y_dim, hidden, generator=gen, dtype=f64)
    dev = torch.device(device)
    model = nn.Sequential(
        nn.Linear(x_dim, hidden, bias=False), nn.Linear(hidden, y_dim, bias=False)
    ).to(device=dev, dtype=dtype)
    with torch.no_grad():
        model[0].weight.copy_(w_first)
        model[1].weight.copy_(w_second)

    def cast(t: Tensor) -> Tensor:
        return t.to(device=dev, dtype=dtype)

    return RahimiRechtProblem(
        variant=variant,
        model=model,
        x=cast(x),
        y=cast(y),
        A=cast(A),
        row_scales=cast(scales),
        loss_fn=partial(sum_of_squares_loss, reduction=reduction),
    )
