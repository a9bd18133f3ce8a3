"""Noisy 2-D test functions in the style of DeepOBS (``two_d_rosenbrock``, ``_beale``, ``_branin``).

Re-implemented from the DeepOBS definitions (the originals are TensorFlow-only). Each example
carries a noise pair ``(x, y) ~ N(0, 1)``; its loss is

    ``ℓ(u, v; x, y) = f(u, v) + u·x + v·y``,

so the expected loss is ``f`` and mini-batch gradients carry additive isotropic noise of standard
deviation ``1/sqrt(B)`` per coordinate.  The training set has ``train_size = 10000`` noise pairs
drawn with ``numpy.random.RandomState(seed)`` (``seed = 42``) as ``standard_normal((N, 2))``; the
test set is all zeros (it evaluates ``f`` itself).  Values of the draws are not claimed to be
identical to DeepOBS's.

Functions, starting points and known minima:

* Rosenbrock ``(1-u)^2 + 100 (v-u^2)^2``; start ``(-0.5, 1.5)``; minimum ``f(1, 1) = 0``.
* Beale ``(1.5 - u + uv)^2 + (2.25 - u + uv^2)^2 + (2.625 - u + uv^3)^2``; start ``(-4.5, 4.5)``;
  minimum ``f(3, 0.5) = 0``.
* Branin ``(v - 5.1/(4π²) u² + (5/π) u - 6)^2 + 10 (1 - 1/(8π)) cos u + 10``; start
  ``(2.5, 12.5)``; three global minima ``(-π, 12.275)``, ``(π, 2.275)``, ``(3π, 2.475)`` with
  value ``5/(4π) ≈ 0.397887``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.problems.losses import mean_output_loss

__all__ = [
    "TWO_D_FUNCTIONS",
    "NoisyTwoDModel",
    "NoisyTwoDProblem",
    "TwoDFunction",
    "beale",
    "branin",
    "make_noisy_two_d",
    "rosenbrock_2d",
]


def _uv(theta: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(theta, Tensor) or theta.ndim == 0 or theta.shape[-1] != 2:
        raise ValueError("theta must be a tensor whose last dimension has size 2 (u, v)")
    return theta[..., 0], theta[..., 1]


def rosenbrock_2d(theta: Tensor) -> Tensor:
    """``(1-u)^2 + 100 (v-u^2)^2``.

    Example:
        >>> import torch
        >>> rosenbrock_2d(torch.tensor([1.0, 1.0]))
        tensor(0.)
    """
    u, v = _uv(theta)
    return (1 - u) ** 2 + 100 * (v - u**2) ** 2


def beale(theta: Tensor) -> Tensor:
    """``(1.5 - u + uv)^2 + (2.25 - u + uv^2)^2 + (2.625 - u + uv^3)^2``.

    Example:
        >>> import torch
        >>> beale(torch.tensor([3.0, 0.5]))
        tensor(0.)
    """
    u, v = _uv(theta)
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2


def branin(theta: Tensor) -> Tensor:
    """``(v - 5.1/(4π²) u² + (5/π) u - 6)^2 + 10 (1 - 1/(8π)) cos u + 10``.

    Example:
        >>> import math, torch
        >>> round(float(branin(torch.tensor([math.pi, 2.275], dtype=torch.float64))), 6)
        0.397887
    """
    u, v = _uv(theta)
    b, c = 5.1 / (4 * math.pi**2), 5 / math.pi
    return (v - b * u**2 + c * u - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * torch.cos(u) + 10


@dataclass(frozen=True)
class TwoDFunction:
    """A deterministic 2-D test function with its DeepOBS start and known minima.

    Attributes:
        name: ``"rosenbrock"``, ``"beale"`` or ``"branin"``.
        f: The function of ``theta`` (last dim 2).
        start: DeepOBS starting point ``(u0, v0)``.
        minima: All global minimisers.
        min_value: The global minimum value.
    """

    name: str
    f: Callable[[Tensor], Tensor]
    start: tuple[float, float]
    minima: tuple[tuple[float, float], ...]
    min_value: float


#: The three DeepOBS 2-D functions by name.
TWO_D_FUNCTIONS: dict[str, TwoDFunction] = {
    "rosenbrock": TwoDFunction("rosenbrock", rosenbrock_2d, (-0.5, 1.5), ((1.0, 1.0),), 0.0),
    "beale": TwoDFunction("beale", beale, (-4.5, 4.5), ((3.0, 0.5),), 0.0),
    "branin": TwoDFunction(
        "branin",
        branin,
        (2.5, 12.5),
        ((-math.pi, 12.275), (math.pi, 2.275), (3 * math.pi, 2.475)),
        5 / (4 * math.pi),
    ),
}


class NoisyTwoDModel(nn.Module):
    """Parameter ``theta = (u, v)``; ``forward(noise)`` returns per-example losses ``(B,)``.

    ``noise`` has shape ``(B, 2)`` (the ``(x, y)`` pairs); output ``f(θ) + noise @ θ``. Pair it
    with :func:`~curvlab.problems.mean_output_loss` (whose GGN is zero; use the Hessian).

    Example:
        >>> import torch
        >>> m = NoisyTwoDModel(beale, torch.tensor([3.0, 0.5]))
        >>> m(torch.zeros(2, 2))
        tensor([0., 0.], grad_fn=<AddBackward0>)
    """

    def __init__(self, f: Callable[[Tensor], Tensor], theta0: Tensor) -> None:
        super().__init__()
        if not isinstance(theta0, Tensor) or theta0.shape != (2,):
            raise ValueError("theta0 must be a tensor of shape (2,)")
        self.f = f
        self.theta = nn.Parameter(theta0.detach().clone())

    def forward(self, noise: Tensor) -> Tensor:
        if noise.ndim != 2 or noise.shape[1] != 2:
            raise ValueError(f"noise must have shape (B, 2), got {tuple(noise.shape)}")
        return self.f(self.theta) + noise @ self.theta


@dataclass
class NoisyTwoDProblem:
    """A noisy DeepOBS-style 2-D problem: model, loss and noise data.

    ``targets`` are zeros of shape ``(N,)`` and are ignored by the loss; they exist so that
    ``(inputs, targets)`` batches look like every other problem's.

    Attributes:
        function: The deterministic :class:`TwoDFunction`.
        model: :class:`NoisyTwoDModel` initialised at ``function.start``.
        x_train: Training noise ``(train_size, 2)``.
        y_train: Zeros ``(train_size,)``.
        x_test: Zeros ``(test_size, 2)`` (evaluates ``f``).
        y_test: Zeros ``(test_size,)``.
        loss_fn: :func:`~curvlab.problems.mean_output_loss`.
    """

    function: TwoDFunction
    model: NoisyTwoDModel
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default=mean_output_loss)

    def objective(self, theta: Tensor | None = None) -> Tensor:
        """The noise-free ``f`` at ``theta`` (default: the model's current parameter)."""
        return self.function.f(self.model.theta if theta is None else theta)

    def distance_to_minimum(self) -> float:
        """Euclidean distance from the current parameter to the nearest global minimiser."""
        theta = self.model.theta.detach()
        mins = torch.tensor(self.function.minima, dtype=theta.dtype, device=theta.device)
        return float(torch.linalg.vector_norm(mins - theta, dim=1).min())


def make_noisy_two_d(
    name: str,
    *,
    train_size: int = 10000,
    test_size: int = 10000,
    noise_std: float = 1.0,
    seed: int = 42,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> NoisyTwoDProblem:
    """Build the noisy 2-D problem ``name`` (``"rosenbrock"``, ``"beale"`` or ``"branin"``).

    Args:
        name: Function name.
        train_size: Number of training noise pairs (DeepOBS: 10000).
        test_size: Number of (all-zero) test pairs.
        noise_std: Standard deviation of ``x`` and ``y`` (DeepOBS: 1.0).
        seed: Seed of ``numpy.random.RandomState`` for the training noise (DeepOBS: 42).
        dtype: Floating dtype (default float64).
        device: Device of all tensors and the model.

    Example:
        >>> prob = make_noisy_two_d("beale")
        >>> prob.model.theta.tolist(), prob.x_train.shape
        ([-4.5, 4.5], torch.Size([10000, 2]))
    """
    if name not in TWO_D_FUNCTIONS:
        raise ValueError(f"unknown 2-D function {name!r}; known: {', '.join(TWO_D_FUNCTIONS)}")
    for arg, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if not isinstance(noise_std, int | float) or noise_std < 0:
        raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
    func = TWO_D_FUNCTIONS[name]
    noise = noise_std * np.random.RandomState(seed).standard_normal((train_size, 2))
    dev = torch.device(device)
    x_train = torch.from_numpy(noise).to(device=dev, dtype=dtype)
    model = NoisyTwoDModel(func.f, torch.tensor(func.start, dtype=dtype, device=dev))
    return NoisyTwoDProblem(
        function=func,
        model=model,
        x_train=x_train,
        y_train=torch.zeros(train_size, dtype=dtype, device=dev),
        x_test=torch.zeros(test_size, 2, dtype=dtype, device=dev),
        y_test=torch.zeros(test_size, dtype=dtype, device=dev),
    )
