r"""The (stochastic) Rosenbrock function as coded by the CurveBall authors.

Definition (``albanie/mcnToyOptim``, used for the CurveBall paper's Rosenbrock experiments; the
stochastic variant follows Yang & Deb 2010):

.. math::

    f_\varepsilon(u, v) = (1 - u)^2 + 100\,\varepsilon^2\,(v - u^2)^2,
    \qquad \varepsilon = s \cdot U[0, 1],

with ``s`` the noise scale. ``s = 0`` or ``noise_scale=None`` is the deterministic function
(``ε = 1``). Note the multiplier of the 100-term is ``ε²``, not ``ε``. Least-squares form (used
by CurveBall's ``'ls'`` loss with batch size 1):

.. math::

    r_\varepsilon(u, v) = [\,10\,\varepsilon\,(v - u^2),\; 1 - u\,], \qquad
    f_\varepsilon = \lVert r_\varepsilon \rVert^2 \quad (\text{no factor } 1/2).

Start ``(-0.25, -0.25) + δ (1, 1)`` with one ``δ = (U[0,1] - 0.5) · x0_noise`` shared by both
coordinates (``x0_noise = 0.5``, i.e. ``δ ~ U[-0.25, 0.25]``); minimum ``(1, 1)`` with value 0;
convergence tolerance ``1e-4`` on the loss.

Noise protocol: one ``ε`` is drawn **per iteration** from an explicit :class:`torch.Generator`
(:meth:`StochasticRosenbrock.sample_eps` / :meth:`StochasticRosenbrock.draw_batch`) and passed to
every evaluation of that iteration. An optimizer that evaluates several times per iteration
(line search, CurveBall's λ test, a 2-point closure) gets the **same** noise by reusing the batch
and **fresh** noise by drawing again (the MATLAB baselines redraw at every function evaluation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.problems.losses import sum_of_squares_loss

__all__ = [
    "ROSENBROCK_MINIMUM",
    "ROSENBROCK_START",
    "ROSENBROCK_TOLERANCE",
    "RosenbrockResidualModel",
    "StochasticRosenbrock",
    "deterministic_rosenbrock",
    "rosenbrock",
    "rosenbrock_gradient",
    "rosenbrock_residuals",
]

#: Centre of the CurveBall start region.
ROSENBROCK_START = (-0.25, -0.25)
#: Global minimiser (value 0 for every ε).
ROSENBROCK_MINIMUM = (1.0, 1.0)
#: Convergence tolerance on the loss used by the CurveBall toy experiments.
ROSENBROCK_TOLERANCE = 1e-4


def _split(theta: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(theta, Tensor) or theta.ndim == 0 or theta.shape[-1] != 2:
        raise ValueError("theta must be a tensor whose last dimension has size 2 (u, v)")
    return theta[..., 0], theta[..., 1]


def rosenbrock(theta: Tensor, eps: Tensor | float = 1.0) -> Tensor:
    """``f_ε(u, v) = (1 - u)^2 + 100 ε^2 (v - u^2)^2`` for ``theta[..., :] = (u, v)``.

    Broadcasts over leading dimensions of ``theta`` and ``eps``.

    Example:
        >>> import torch
        >>> rosenbrock(torch.tensor([1.0, 1.0])), rosenbrock(torch.tensor([0.0, 0.0]))
        (tensor(0.), tensor(1.))
    """
    u, v = _split(theta)
    return (1 - u) ** 2 + 100 * eps**2 * (v - u**2) ** 2


def rosenbrock_residuals(theta: Tensor, eps: Tensor | float = 1.0) -> Tensor:
    """Residuals ``[10 ε (v - u^2), 1 - u]`` (last dim 2) with ``||r||^2 = f_ε``.

    Example:
        >>> import torch
        >>> rosenbrock_residuals(torch.tensor([0.0, 1.0]), 0.5)
        tensor([5., 1.])
    """
    u, v = _split(theta)
    eps_t = torch.as_tensor(eps, dtype=theta.dtype, device=theta.device)
    return torch.stack(torch.broadcast_tensors(10 * eps_t * (v - u**2), 1 - u), dim=-1)


def rosenbrock_gradient(theta: Tensor, eps: Tensor | float = 1.0) -> Tensor:
    """Closed-form gradient ``[-2(1-u) - 400 ε² u (v-u²), 200 ε² (v-u²)]``.

    Example:
        >>> import torch
        >>> rosenbrock_gradient(torch.tensor([1.0, 1.0]))
        tensor([0., 0.])
    """
    u, v = _split(theta)
    e2 = torch.as_tensor(eps, dtype=theta.dtype, device=theta.device) ** 2
    du = -2 * (1 - u) - 400 * e2 * u * (v - u**2)
    dv = 200 * e2 * (v - u**2)
    return torch.stack(torch.broadcast_tensors(du, dv), dim=-1)


class RosenbrockResidualModel(nn.Module):
    """``θ = (u, v)`` as the only parameter; ``forward(eps)`` returns the residuals.

    Input ``eps`` has shape ``(B,)`` or ``(B, 1)`` (one noise value per "example"); the output has
    shape ``(B, 2)``. With :func:`~curvlab.problems.sum_of_squares_loss` against zero targets and
    ``B = 1`` the loss equals ``f_ε(θ)`` exactly; this is how CurveBall's least-squares path
    sees the problem (output Hessian ``2 I``).

    Example:
        >>> import torch
        >>> m = RosenbrockResidualModel(torch.tensor([1.0, 1.0]))
        >>> m(torch.tensor([[3.0]]))
        tensor([[0., 0.]], grad_fn=<StackBackward0>)
    """

    def __init__(self, theta0: Tensor) -> None:
        super().__init__()
        if not isinstance(theta0, Tensor) or theta0.shape != (2,):
            raise ValueError("theta0 must be a tensor of shape (2,)")
        if not theta0.dtype.is_floating_point:
            raise ValueError(f"theta0 must be floating point, got {theta0.dtype}")
        self.theta = nn.Parameter(theta0.detach().clone())

    def forward(self, eps: Tensor) -> Tensor:
        if eps.ndim == 2 and eps.shape[1] == 1:
            eps = eps[:, 0]
        if eps.ndim != 1:
            raise ValueError(f"eps must have shape (B,) or (B, 1), got {tuple(eps.shape)}")
        return rosenbrock_residuals(self.theta.expand(eps.shape[0], 2), eps)


class StochasticRosenbrock:
    """The CurveBall stochastic Rosenbrock problem (see the module docstring for the definition).

    Args:
        noise_scale: ``s`` in ``ε = s · U[0, 1]``; ``None`` or ``0`` gives the deterministic
            function (``ε = 1``). The CurveBall experiments use ``s`` in ``{1, 2, 3, 4}``.
        x0_noise: Width of the random start offset (0.5 in the experiments, 0 in the figures).
        dtype: Floating dtype of tensors created by this object (default ``torch.float64``).
        device: Device of tensors created by this object.

    Example:
        >>> import torch
        >>> prob = StochasticRosenbrock(noise_scale=1.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> model = prob.make_model(prob.initial_point(g))
        >>> inputs, targets = prob.draw_batch(g)          # one ε for this iteration
        >>> loss = prob.loss_fn(model(inputs), targets)    # == f_ε(θ)
        >>> torch.allclose(loss, prob.loss(model.theta, inputs[0, 0]))
        True
    """

    minimum: tuple[float, float] = ROSENBROCK_MINIMUM
    min_value: float = 0.0
    tolerance: float = ROSENBROCK_TOLERANCE

    def __init__(
        self,
        noise_scale: float | None = None,
        *,
        x0_noise: float = 0.5,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if noise_scale is not None and (
            not isinstance(noise_scale, int | float) or noise_scale < 0
        ):
            raise ValueError(f"noise_scale must be None or a number >= 0, got {noise_scale!r}")
        if not isinstance(x0_noise, int | float) or x0_noise < 0:
            raise ValueError(f"x0_noise must be a number >= 0, got {x0_noise!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.noise_scale = None if not noise_scale else float(noise_scale)
        self.x0_noise = float(x0_noise)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def deterministic(self) -> bool:
        """True when ``ε ≡ 1``."""
        return self.noise_scale is None

    def sample_eps(self, generator: torch.Generator | None) -> Tensor:
        """Draw one ``ε = s · U[0,1]`` (a 0-d tensor); ``1`` if deterministic.

        The deterministic problem consumes no randomness and accepts ``generator=None``.
        """
        if self.deterministic:
            return torch.ones((), dtype=self.dtype, device=self.device)
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                "the stochastic Rosenbrock needs generator=<torch.Generator> to draw ε, got "
                f"{type(generator).__name__}"
            )
        u = torch.rand((), generator=generator, dtype=self.dtype, device=generator.device)
        return (self.noise_scale * u).to(self.device)

    def draw_batch(self, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Fresh noise as an operator batch ``(inputs, targets)``: ``ε`` (1, 1) and zeros (1, 2)."""
        eps = self.sample_eps(generator).reshape(1, 1)
        return eps, torch.zeros(1, 2, dtype=self.dtype, device=self.device)

    def batch(self, eps: Tensor | float) -> tuple[Tensor, Tensor]:
        """The operator batch for a given ``ε`` (reuse it for same-noise re-evaluations)."""
        e = torch.as_tensor(eps, dtype=self.dtype, device=self.device).reshape(1, 1)
        return e, torch.zeros(1, 2, dtype=self.dtype, device=self.device)

    def initial_point(self, generator: torch.Generator | None = None) -> Tensor:
        """``(-0.25, -0.25) + δ (1, 1)``, ``δ = (U[0,1] - 0.5) · x0_noise``.

        ``generator`` is required when ``x0_noise > 0`` (``δ = 0`` and no draw otherwise).
        """
        start = torch.tensor(ROSENBROCK_START, dtype=self.dtype, device=self.device)
        if self.x0_noise == 0:
            return start
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                "initial_point needs generator=<torch.Generator> when x0_noise > 0, got "
                f"{type(generator).__name__}"
            )
        u = torch.rand((), generator=generator, dtype=self.dtype, device=generator.device)
        return start + (u.to(self.device) - 0.5) * self.x0_noise

    def make_model(self, theta0: Tensor | None = None) -> RosenbrockResidualModel:
        """Residual model with parameter ``θ`` initialised to ``theta0`` (default: the centre)."""
        if theta0 is None:
            theta0 = torch.tensor(ROSENBROCK_START, dtype=self.dtype, device=self.device)
        return RosenbrockResidualModel(theta0.to(dtype=self.dtype, device=self.device))

    @staticmethod
    def loss_fn(output: Tensor, target: Tensor) -> Tensor:
        """``mean_b ||r_b - target_b||^2`` (equals ``f_ε`` for one noise draw)."""
        return sum_of_squares_loss(output, target)

    @staticmethod
    def loss(theta: Tensor, eps: Tensor | float = 1.0) -> Tensor:
        """``f_ε(θ)`` as a function of a parameter tensor ``θ`` (shape ``(..., 2)``)."""
        return rosenbrock(theta, eps)

    @staticmethod
    def residuals(theta: Tensor, eps: Tensor | float = 1.0) -> Tensor:
        """``r_ε(θ)`` (shape ``(..., 2)``)."""
        return rosenbrock_residuals(theta, eps)

    def converged(self, loss_value: Tensor | float) -> bool:
        """Whether ``loss_value < tolerance`` (1e-4)."""
        return float(loss_value) < self.tolerance

    def __repr__(self) -> str:
        return (
            f"StochasticRosenbrock(noise_scale={self.noise_scale}, x0_noise={self.x0_noise}, "
            f"dtype={self.dtype})"
        )


def deterministic_rosenbrock(
    *,
    x0_noise: float = 0.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> StochasticRosenbrock:
    """The deterministic Rosenbrock problem (``ε ≡ 1``), by default from the fixed start.

    Example:
        >>> prob = deterministic_rosenbrock()
        >>> prob.deterministic, prob.initial_point().tolist()
        (True, [-0.25, -0.25])
    """
    return StochasticRosenbrock(None, x0_noise=x0_noise, dtype=dtype, device=device)
