r"""DeepOBS ``quadratic_deep``, re-implemented from its definition.

Problem: parameter :math:`\theta \in \mathbb{R}^{100}`, initialised to ones; data points
:math:`x_n \sim \mathcal{N}(0, 0.6^2 I)`; per-example loss
:math:`\ell_n(\theta) = \tfrac12 (\theta - x_n)^\top Q (\theta - x_n)` with
:math:`Q = R^\top \operatorname{diag}(\lambda) R`.

* Eigenvalues: ``np.random.RandomState(42)``: first 90 draws ``U(0, 1)``, then 10 draws
  ``U(30, 60)`` (concatenated in that order), as in DeepOBS.
* Rotation ``R``: a Haar-distributed orthogonal matrix, here made by our own method: QR of a
  ``100 x 100`` standard Gaussian matrix (``RandomState(rotation_seed)``) with the signs of the
  columns of ``Q`` fixed by the signs of ``diag(R)``. DeepOBS uses a different algorithm
  (Diaconis–Shahshahani) and generator state, so **our Q is not DeepOBS's Q**; it has the same
  spectrum and the same distribution of eigenvectors.
* Data: 1000 training points from ``RandomState(42).normal(0, 0.6, (1000, 100))`` and 1000 test
  points from seed 43.

Operator view: :class:`QuadraticDeepModel` maps a batch ``x`` to residuals ``θ - x`` (shape
``(N, 100)``) and :class:`QuadraticLoss` computes :math:`\frac1N\sum_n \frac12 (r_n - t_n)^\top Q
(r_n - t_n)` against zero targets ``t``. Every mini-batch Hessian (and GGN) with respect to θ
equals ``Q`` exactly; the gradient is :math:`Q(\theta - \bar x_B)`, the expected loss is
:math:`\frac12 \theta^\top Q \theta + \frac12 \cdot 0.36 \operatorname{tr} Q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.data.dataset import Dataset

__all__ = [
    "QUADRATIC_DEEP_DIM",
    "QuadraticDeepModel",
    "QuadraticDeepProblem",
    "QuadraticLoss",
    "haar_orthogonal",
    "make_quadratic_deep",
    "quadratic_deep_eigenvalues",
]

#: Dimension of the ``quadratic_deep`` parameter.
QUADRATIC_DEEP_DIM = 100


def quadratic_deep_eigenvalues(seed: int = 42) -> np.ndarray:
    """The 100 eigenvalues: 90 draws ``U(0,1)``, then 10 draws ``U(30,60)``, ``RandomState(seed)``.

    Example:
        >>> lam = quadratic_deep_eigenvalues()
        >>> lam.shape, bool(lam[:90].max() < 1), bool(lam[90:].min() >= 30)
        ((100,), True, True)
    """
    rng = np.random.RandomState(seed)
    return np.concatenate([rng.uniform(0.0, 1.0, 90), rng.uniform(30.0, 60.0, 10)])


def haar_orthogonal(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal ``dim x dim`` matrix (QR of a Gaussian matrix, sign-corrected).

    ``A = QR`` with ``A`` standard Gaussian; multiplying column ``j`` of ``Q`` by
    ``sign(R_jj)`` makes the factorisation unique, and the result is Haar distributed on the
    orthogonal group (Mezzadri 2007).

    Example:
        >>> import numpy as np
        >>> R = haar_orthogonal(5, seed=0)
        >>> bool(np.allclose(R.T @ R, np.eye(5)))
        True
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    gauss = np.random.RandomState(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gauss)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


class QuadraticDeepModel(nn.Module):
    """``forward(x) = θ - x`` with the single parameter ``θ`` (shape ``(dim,)``, init ones).

    Example:
        >>> import torch
        >>> m = QuadraticDeepModel(3, dtype=torch.float64)
        >>> m(torch.ones(2, 3)).abs().sum().item()
        0.0
    """

    def __init__(
        self,
        dim: int = QUADRATIC_DEEP_DIM,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.theta.shape[0]:
            raise ValueError(f"x must have shape (N, {self.theta.shape[0]}), got {tuple(x.shape)}")
        return self.theta - x


class QuadraticLoss(nn.Module):
    r"""``loss(output, target) = (1/N) Σ_n ½ (output_n - target_n)^T Q (output_n - target_n)``.

    ``Q`` is stored as a (non-trainable) buffer.

    Example:
        >>> import torch
        >>> loss = QuadraticLoss(2 * torch.eye(2))
        >>> loss(torch.ones(3, 2), torch.zeros(3, 2))
        tensor(2.)
    """

    def __init__(self, Q: Tensor) -> None:
        super().__init__()
        if not isinstance(Q, Tensor) or Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
            raise ValueError("Q must be a square 2-D tensor")
        self.register_buffer("Q", Q)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape != target.shape or output.ndim != 2:
            raise ValueError(
                f"output and target must both have shape (N, {self.Q.shape[0]}), got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        r = output - target
        return 0.5 * ((r @ self.Q) * r).sum(dim=1).mean()


@dataclass
class QuadraticDeepProblem:
    """Everything about ``quadratic_deep``: model, loss, ``Q`` and the data.

    Attributes:
        model: :class:`QuadraticDeepModel` (θ initialised to ones).
        loss_fn: :class:`QuadraticLoss` holding ``Q``.
        Q: The ``(100, 100)`` Hessian (exactly symmetric).
        eigenvalues: The eigenvalues ``λ`` (unsorted, DeepOBS order).
        rotation: The orthogonal ``R`` with ``Q = R^T diag(λ) R`` (up to symmetrisation).
        dataset: Regression :class:`~curvlab.data.Dataset` with inputs ``x`` and zero targets.
        noise_std: Standard deviation of the data points.
    """

    model: QuadraticDeepModel
    loss_fn: QuadraticLoss
    Q: Tensor
    eigenvalues: Tensor
    rotation: Tensor
    dataset: Dataset
    noise_std: float = 0.6

    def expected_loss(self, theta: Tensor | None = None) -> Tensor:
        """``½ θ^T Q θ + ½ σ² tr Q`` with ``σ = noise_std`` used to build the data."""
        th = self.model.theta if theta is None else theta
        return 0.5 * th @ self.Q @ th + 0.5 * self.noise_std**2 * torch.trace(self.Q)


def make_quadratic_deep(
    *,
    num_train: int = 1000,
    num_test: int = 1000,
    noise_std: float = 0.6,
    train_seed: int = 42,
    test_seed: int = 43,
    eigenvalue_seed: int = 42,
    rotation_seed: int = 42,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> QuadraticDeepProblem:
    """Build ``quadratic_deep`` (see the module docstring; defaults are DeepOBS's).

    Args:
        num_train: Training points (1000).
        num_test: Test points (1000).
        noise_std: Standard deviation of the data points (0.6).
        train_seed: ``RandomState`` seed of the training data (42).
        test_seed: ``RandomState`` seed of the test data (43).
        eigenvalue_seed: ``RandomState`` seed of the eigenvalues (42).
        rotation_seed: ``RandomState`` seed of our Haar rotation (42).
        dtype: Floating dtype (default float64).
        device: Device.

    Example:
        >>> import torch
        >>> prob = make_quadratic_deep()
        >>> inputs, targets = prob.dataset.train
        >>> loss = prob.loss_fn(prob.model(inputs), targets)
        >>> prob.Q.shape, inputs.shape, bool(torch.allclose(prob.Q, prob.Q.T))
        (torch.Size([100, 100]), torch.Size([1000, 100]), True)
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(noise_std, int | float) or noise_std < 0:
        raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    dim = QUADRATIC_DEEP_DIM
    lam = quadratic_deep_eigenvalues(eigenvalue_seed)
    rot = haar_orthogonal(dim, rotation_seed)
    q = rot.T @ np.diag(lam) @ rot
    q = 0.5 * (q + q.T)
    x_train = np.random.RandomState(train_seed).normal(0.0, noise_std, (num_train, dim))
    x_test = np.random.RandomState(test_seed).normal(0.0, noise_std, (num_test, dim))
    dev = torch.device(device)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device=dev, dtype=dtype)

    Q = t(q)
    dataset = Dataset(
        t(x_train),
        torch.zeros(num_train, dim, dtype=dtype, device=dev),
        t(x_test),
        torch.zeros(num_test, dim, dtype=dtype, device=dev),
        name="quadratic_deep",
        num_classes=None,
        input_shape=(dim,),
        task="regression",
    )
    return QuadraticDeepProblem(
        model=QuadraticDeepModel(dim, dtype=dtype, device=dev),
        loss_fn=QuadraticLoss(Q),
        Q=Q,
        eigenvalues=t(lam),
        rotation=t(rot),
        dataset=dataset,
        noise_std=float(noise_std),
    )
