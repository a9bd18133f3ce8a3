"""Lanczos iteration with full reorthogonalisation, and extreme eigenpairs of symmetric operators.

The operator ``op`` can be any object with ``op @ M`` for ``M`` of shape ``(P, K)`` plus
``.shape == (P, P)``, ``.dtype`` and ``.device`` (e.g. a curvlab
:class:`~curvlab.operators.base.LinearOperator`). It must be symmetric; operators that declare
``symmetric=False`` are rejected.

Numerics: the Lanczos vectors live in the operator's dtype and device; every new vector is
orthogonalised against *all* previous ones twice (classical Gram-Schmidt, "twice is enough"),
so no spurious copies of converged eigenvalues appear. The tridiagonal matrix
``T = tridiag(beta, alpha, beta)`` is kept in float64 on the CPU and diagonalised with
:func:`torch.linalg.eigh`.

Breakdown: if ``beta_j <= 100 * eps * ||A||_est`` the Krylov space is (numerically) invariant.
:func:`lanczos_tridiagonal` then stops early (returning fewer than ``num_iter`` steps) unless
``restart_on_breakdown=True``, in which case it continues with a fresh random vector orthogonal
to all previous ones and records ``beta_j = 0`` (so ``T`` becomes block diagonal and eigenvalues
outside the first invariant subspace, e.g. further copies of a repeated eigenvalue, are found).
:func:`lanczos` always restarts.

Memory: ``P * num_iter`` entries for the Lanczos basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvlab.linalg._utils import (
    apply,
    check_generator,
    check_int,
    check_operator,
    check_real,
    check_symmetric,
    check_vector,
)

__all__ = ["LanczosResult", "LanczosTridiagonal", "lanczos", "lanczos_tridiagonal"]

_WHICH = ("largest", "smallest", "both")


class LanczosTridiagonal(NamedTuple):
    """Output of :func:`lanczos_tridiagonal` (``m <= num_iter`` steps were taken).

    Attributes:
        alpha: Diagonal of ``T``, shape ``(m,)``, float64 on the CPU.
        beta: Off-diagonal of ``T``, shape ``(m - 1,)``, float64 on the CPU (zeros mark
            restarts after a breakdown).
        Q: Orthonormal Lanczos basis ``(P, m)`` in the operator's dtype and device, with
            ``Q.T @ A @ Q ~= T``; ``Q[:, 0]`` is the normalised start vector.
    """

    alpha: Tensor
    beta: Tensor
    Q: Tensor

    def tridiagonal(self) -> Tensor:
        """The dense ``(m, m)`` float64 tridiagonal matrix ``T``.

        Returns:
            ``diag(alpha) + diag(beta, 1) + diag(beta, -1)``.

        Example:
            >>> from curvlab.operators.base import DenseOperator
            >>> out = lanczos_tridiagonal(DenseOperator(torch.eye(2, dtype=torch.float64)), 1)
            >>> out.tridiagonal()
            tensor([[1.]], dtype=torch.float64)
        """
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`: Ritz values in ascending order and matching Ritz vectors.

    Attributes:
        eigenvalues: Shape ``(k,)``, ascending, in the operator's dtype and device.
        eigenvectors: Shape ``(P, k)``, orthonormal columns; column ``i`` belongs to
            ``eigenvalues[i]``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of ``w`` along the rows of ``basis`` (twice)."""
    for _ in range(2):
        w = w - basis.mT @ (basis @ w)
    return w


def _random_start(p: int, op: Any, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else op.device
    v = torch.randn(p, generator=generator, device=gen_device, dtype=op.dtype)
    return v.to(op.device)


def _run(
    op: Any,
    p: int,
    num_iter: int,
    v0: Tensor,
    generator: torch.Generator | None,
    restart: bool,
    converged: Callable[[list[float], list[float], float], bool] | None = None,
) -> tuple[list[float], list[float], Tensor]:
    """Core Lanczos loop; returns alphas, betas (len m - 1) and the basis as rows ``(m, P)``."""
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    rows = torch.zeros(num_iter, p, dtype=dtype, device=device)
    norm0 = torch.linalg.vector_norm(v0).item()
    if not math.isfinite(norm0) or norm0 == 0.0:
        raise ValueError(f"v0 must be a non-zero finite vector, got norm {norm0}")
    rows[0] = v0 / norm0
    alphas: list[float] = []
    betas: list[float] = []
    anorm = 0.0
    for j in range(num_iter):
        q = rows[j]
        w = apply(op, q.unsqueeze(1))[:, 0]
        anorm = max(anorm, torch.linalg.vector_norm(w).item())
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * rows[j - 1]
        w = _orthogonalize(w, rows[: j + 1])
        alpha_f = alpha.item()
        if not math.isfinite(alpha_f):
            raise RuntimeError(f"Lanczos produced a non-finite value at step {j} (alpha={alpha_f})")
        alphas.append(alpha_f)
        if j == num_iter - 1:
            break
        beta = torch.linalg.vector_norm(w).item()
        if converged is not None and converged(alphas, betas, beta):
            break
        if beta <= 100 * eps * anorm:
            if not restart:
                break
            r = _orthogonalize(_random_start(p, op, generator), rows[: j + 1])
            r_norm = torch.linalg.vector_norm(r).item()
            if r_norm <= 100 * eps * math.sqrt(p):  # the basis already spans everything
                break
            betas.append(0.0)
            rows[j + 1] = r / r_norm
        else:
            betas.append(beta)
            rows[j + 1] = w / beta
    m = len(alphas)
    return alphas, betas[: m - 1], rows[:m]


def _check_start(v0: Any, p: int, op: Any, generator: torch.Generator | None) -> Tensor:
    if v0 is None:
        return _random_start(p, op, generator)
    return check_vector(v0, "v0", p, op)


def lanczos_tridiagonal(
    op: Any,
    num_iter: int,
    v0: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    restart_on_breakdown: bool = False,
) -> LanczosTridiagonal:
    """Run ``num_iter`` Lanczos steps from ``v0``: ``A Q ~= Q T`` with ``T`` tridiagonal.

    Args:
        op: Symmetric operator ``(P, P)`` (see the module docstring).
        num_iter: Number of steps ``m``, ``1 <= m <= P``.
        v0: Start vector ``(P,)`` in the operator's dtype/device (normalised internally);
            default: a standard normal vector drawn with ``generator``.
        generator: Random source for the default ``v0`` and restart vectors; ``None`` uses the
            global RNG of ``op.device``. Samples are drawn on the generator's device and moved
            to ``op.device``.
        restart_on_breakdown: On an invariant subspace, continue with a random orthogonal
            vector (``beta = 0``) instead of stopping early.

    Returns:
        :class:`LanczosTridiagonal` ``(alpha, beta, Q)``; fewer than ``num_iter`` steps if a
        breakdown stopped the iteration. For SLQ, ``T``'s eigenvalues are the quadrature nodes
        and the squared first components of its eigenvectors the weights.

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or declares ``symmetric=False``, ``num_iter`` is
            out of range, or ``v0`` has the wrong shape/dtype/device or is zero.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> out = lanczos_tridiagonal(A, 3, torch.ones(3, dtype=torch.float64))
        >>> torch.linalg.eigvalsh(out.tridiagonal())
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    p = check_operator(op)
    check_symmetric(op, "op", "lanczos_tridiagonal")
    num_iter = check_int(num_iter, "num_iter", 1, p)
    generator = check_generator(generator)
    if not isinstance(restart_on_breakdown, bool):
        raise TypeError(
            f"restart_on_breakdown must be a bool, got {type(restart_on_breakdown).__name__}"
        )
    start = _check_start(v0, p, op, generator)
    alphas, betas, rows = _run(op, p, num_iter, start, generator, restart_on_breakdown)
    return LanczosTridiagonal(
        torch.tensor(alphas, dtype=torch.float64),
        torch.tensor(betas, dtype=torch.float64),
        rows.mT,
    )


def _wanted(m: int, k: int, which: str) -> list[int]:
    """Indices (into ascending Ritz values of an m x m T) of the wanted k eigenvalues."""
    if which == "largest":
        return list(range(m - k, m))
    if which == "smallest":
        return list(range(k))
    n_small = k // 2
    return list(range(n_small)) + list(range(m - (k - n_small), m))


def lanczos(
    op: Any,
    k: int = 6,
    which: str = "largest",
    num_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
) -> LanczosResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Runs ``num_iter`` Lanczos steps (no implicit restarts), restarting with a random
    orthogonal vector whenever an invariant subspace is found, and returns Ritz pairs of the
    tridiagonal matrix. With ``num_iter == P`` the result is exact up to rounding.

    Args:
        op: Symmetric operator ``(P, P)`` (see the module docstring).
        k: Number of eigenpairs, ``1 <= k <= P``.
        which: ``"largest"`` (algebraically largest), ``"smallest"``, or ``"both"``
            (``k // 2`` smallest and ``k - k // 2`` largest, as SciPy's ``eigsh(which="BE")``).
        num_iter: Number of Lanczos steps, ``k <= num_iter <= P``; default
            ``min(P, max(2 * k + 1, 50))``.
        tol: If given, stop early once every wanted Ritz pair has residual bound
            ``|beta_m * s_mi| <= tol * max|theta|`` (checked each step from step ``k`` on; like
            all Lanczos stopping rules this cannot detect eigenvalues not yet seen by the
            Krylov space). ``None`` always runs ``num_iter`` steps.
        generator: Random source for the start vector (if ``v0`` is None) and restarts;
            ``None`` uses the global RNG of ``op.device``; samples are drawn on the generator's
            device and moved to ``op.device``.
        v0: Optional start vector ``(P,)`` in the operator's dtype and device.

    Returns:
        :class:`LanczosResult` ``(eigenvalues, eigenvectors)``: eigenvalues in **ascending**
        order ``(k,)`` and eigenvectors ``(P, k)`` (column ``i`` pairs with eigenvalue ``i``),
        both in the operator's dtype and device.

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or declares ``symmetric=False``, or ``k``,
            ``which``, ``num_iter``, ``tol`` or ``v0`` are invalid.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> vals, vecs = lanczos(A, k=2, num_iter=10, generator=torch.Generator().manual_seed(0))
        >>> [round(v, 8) for v in vals.tolist()]
        [9.0, 10.0]
        >>> vecs.shape
        torch.Size([10, 2])
    """
    p = check_operator(op)
    check_symmetric(op, "op", "lanczos")
    k = check_int(k, "k", 1, p)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if num_iter is None:
        num_iter = min(p, max(2 * k + 1, 50))
    num_iter = check_int(num_iter, "num_iter", k, p)
    if tol is not None:
        tol = check_real(tol, "tol", positive=True)
    generator = check_generator(generator)
    start = _check_start(v0, p, op, generator)

    stop_rule: Callable[[list[float], list[float], float], bool] | None = None
    if tol is not None:
        threshold = tol

        def converged(alphas: list[float], betas: list[float], beta: float) -> bool:
            m = len(alphas)
            if m < k:
                return False
            theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
            idx = _wanted(m, k, which)
            scale = theta.abs().max().item()
            residuals = beta * s[-1, idx].abs()
            return bool((residuals <= threshold * scale).all())

        stop_rule = converged

    alphas, betas, rows = _run(op, p, num_iter, start, generator, True, stop_rule)
    m = len(alphas)
    if m < k:  # pragma: no cover - restarts make this unreachable
        raise RuntimeError(f"Lanczos produced only {m} < k = {k} steps")
    theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
    idx = _wanted(m, k, which)
    s_sel = s[:, idx].to(dtype=op.dtype, device=op.device)
    eigenvectors = rows.mT @ s_sel
    eigenvalues = theta[idx].to(dtype=op.dtype, device=op.device)
    return LanczosResult(eigenvalues, eigenvectors)
