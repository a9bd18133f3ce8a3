"""Conjugate gradients for damped symmetric positive-definite systems ``(A + lambda I) x = b``.

The operator needs ``op @ M`` for ``M`` of shape ``(P, K)``, ``.shape``, ``.dtype`` and
``.device`` (e.g. a curvlab :class:`~curvlab.operators.base.LinearOperator`). ``A + lambda I``
should be symmetric positive definite; operators declaring ``symmetric=False`` are rejected,
and a direction of non-positive curvature ``p^T (A + lambda I) p <= 0`` stops the iteration
(``reason="negative_curvature"``) instead of producing garbage.

Along the way CG tracks the quadratic model ``phi(x) = 1/2 x^T (A + lambda I) x - b^T x``
(monotonically decreasing for SPD systems); its values at every iterate cost one extra dot
product per step via ``phi(x) = -1/2 x^T (r + b)`` with the residual ``r = b - (A + lambda I) x``.
Hessian-free optimisers use them for CG backtracking and for early termination.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.linalg._utils import (
    apply,
    check_int,
    check_operator,
    check_real,
    check_symmetric,
    check_vector,
)

__all__ = ["CGResult", "cg"]

CGCallback = Callable[[int, Tensor, float], "bool | None"]


@dataclass(frozen=True)
class CGResult:
    """Output of :func:`cg`.

    Attributes:
        x: The last iterate, in the same form as ``b`` (flat tensor, list, or dict).
        num_iter: Number of CG iterations performed (operator products, excluding the one for
            the initial residual when ``x0`` is given).
        residual_norm: ``||b - (A + lambda I) x||`` of the returned ``x`` (recursively updated
            residual, as is standard for CG).
        converged: Whether ``residual_norm <= max(tol * ||b||, atol)``.
        reason: ``"converged"``, ``"max_iter"``, ``"negative_curvature"``, ``"callback"`` or
            ``"non_finite"``.
        residual_norms: Residual norm at every iterate ``x_0, ..., x_{num_iter}``.
        quadratic_values: ``phi(x_i)`` at every iterate, same length as ``residual_norms``.
    """

    x: Any
    num_iter: int
    residual_norm: float
    converged: bool
    reason: str
    residual_norms: list[float] = field(default_factory=list)
    quadratic_values: list[float] = field(default_factory=list)


def _to_flat(op: Any, v: Any, name: str, p: int) -> tuple[Tensor, str]:
    """Flatten ``v`` (flat tensor, list/tuple or dict); return it and its form."""
    if isinstance(v, Tensor):
        return check_vector(v, name, p, op), "flat"
    if isinstance(v, list | tuple | Mapping):
        from curvlab.operators.base import LinearOperator  # lazy: avoid an import cycle

        if not isinstance(op, LinearOperator):
            raise TypeError(
                f"{name} in parameter form needs a curvlab LinearOperator (which knows the "
                f"parameter shapes); got op of type {type(op).__name__}, pass a flat tensor"
            )
        try:
            flat = op.flatten(v)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err
        if flat.ndim != 1:
            raise ValueError(f"{name} must be a single vector, got a batch of {flat.shape[1]}")
        return flat, ("dict" if isinstance(v, Mapping) else "list")
    raise TypeError(
        f"{name} must be a torch.Tensor (P,), a list/tuple of parameter-shaped tensors or a "
        f"dict {{name: tensor}}, got {type(v).__name__}"
    )


def cg(
    op: Any,
    b: Tensor | list[Tensor] | tuple[Tensor, ...] | dict[str, Tensor],
    damping: float = 0.0,
    x0: Tensor | list[Tensor] | tuple[Tensor, ...] | dict[str, Tensor] | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    callback: CGCallback | None = None,
    *,
    atol: float = 0.0,
) -> CGResult:
    """Solve ``(A + damping * I) x = b`` by (unpreconditioned) conjugate gradients.

    Stops when ``||r|| <= max(tol * ||b||, atol)`` (relative residual), after ``max_iter``
    iterations, on non-positive curvature, on a non-finite value, or when ``callback``
    returns a truthy value. All arithmetic is in the operator's dtype and device.

    Args:
        op: Symmetric operator ``A`` of shape ``(P, P)`` (see the module docstring).
        b: Right-hand side: flat ``(P,)`` tensor, or (for a curvlab ``LinearOperator``) a
            parameter-form list/tuple or dict. Must have the operator's dtype and device.
        damping: ``lambda >= 0`` added to the diagonal.
        x0: Initial guess in any accepted form (default zeros).
        tol: Relative residual tolerance (``>= 0``).
        max_iter: Maximum number of iterations (``>= 0``); default ``10 * P`` (as SciPy).
        callback: Called after every iteration as ``callback(i, x, residual_norm)`` with the
            iteration number ``i >= 1``, the current flat iterate (a live buffer: clone it to
            keep it, do not modify it) and its residual norm; returning a truthy value stops
            CG (``reason="callback"`` unless that iterate has converged).
        atol: Absolute residual tolerance (``>= 0``).

    Returns:
        :class:`CGResult`; ``x`` has the form of ``b`` (a list for list/tuple input).

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or declares ``symmetric=False``, ``b``/``x0`` have
            the wrong length/shape/dtype/device, or a numeric argument is out of range.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> res = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64), damping=1.0)
        >>> res.converged, res.x * 19  # exact solution (2/19, 9/19)
        (True, tensor([2.0000, 9.0000], dtype=torch.float64))
    """
    p = check_operator(op)
    check_symmetric(op, "op", "cg")
    b_flat, form = _to_flat(op, b, "b", p)
    damping = check_real(damping, "damping", minimum=0.0)
    tol = check_real(tol, "tol", minimum=0.0)
    atol = check_real(atol, "atol", minimum=0.0)
    max_iter = 10 * p if max_iter is None else check_int(max_iter, "max_iter", 0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")

    def damped(v: Tensor) -> Tensor:
        out = apply(op, v.unsqueeze(1))[:, 0]
        return out + damping * v if damping != 0.0 else out

    if x0 is None:
        x = torch.zeros_like(b_flat)
        r = b_flat.clone()
    else:
        x0_flat, _ = _to_flat(op, x0, "x0", p)
        x = x0_flat.clone()
        r = b_flat - damped(x)

    def phi() -> float:
        return -0.5 * torch.dot(x, r + b_flat).item()

    threshold = max(tol * torch.linalg.vector_norm(b_flat).item(), atol)
    rr = torch.dot(r, r).item()
    residual_norms = [math.sqrt(rr)]
    quadratic_values = [phi()]
    reason = "max_iter"
    num_iter = 0
    if not math.isfinite(rr):
        reason = "non_finite"
    elif residual_norms[0] <= threshold:
        reason = "converged"
    else:
        d = r.clone()
        while num_iter < max_iter:
            ad = damped(d)
            curvature = torch.dot(d, ad).item()
            if not math.isfinite(curvature):
                reason = "non_finite"
                break
            if curvature <= 0.0:
                reason = "negative_curvature"
                break
            step = rr / curvature
            x.add_(d, alpha=step)
            r.sub_(ad, alpha=step)
            rr_new = torch.dot(r, r).item()
            num_iter += 1
            residual_norms.append(math.sqrt(rr_new))
            quadratic_values.append(phi())
            if not math.isfinite(rr_new):
                reason = "non_finite"
                break
            stop = callback is not None and callback(num_iter, x, residual_norms[-1])
            if residual_norms[-1] <= threshold:
                reason = "converged"
                break
            if stop:
                reason = "callback"
                break
            d = r + (rr_new / rr) * d
            rr = rr_new
    if form == "flat":
        x_out: Any = x
    else:
        x_out = op.unflatten(x, as_dict=form == "dict")
    return CGResult(
        x=x_out,
        num_iter=num_iter,
        residual_norm=residual_norms[-1],
        converged=reason == "converged",
        reason=reason,
        residual_norms=residual_norms,
        quadratic_values=quadratic_values,
    )
