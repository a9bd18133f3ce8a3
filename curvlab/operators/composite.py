"""Lazy composite operators: sums, scalar multiples, products and adjoints.

These are what the algebra of :class:`~curvlab.operators.base.LinearOperator` builds (``A + B``,
``A - B``, ``alpha * A``, ``-A``, ``A @ B``, ``A.T``): nothing is materialised, every product
with the composite runs the operands' products. Operands must have equal shape, dtype and
device; the composite keeps their (common) parameter layout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.operators.base import LinearOperator
from curvlab.operators.flat import _same_device

__all__ = ["AdjointOperator", "ProductOperator", "ScaledOperator", "SumOperator"]


def _check_scalar(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = "; use float(t) for a 0-d tensor" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _is_default_layout(op: LinearOperator) -> bool:
    return op._param_names == ["param0"] and op._param_shapes == [torch.Size([op._shape[0]])]


def _merge_operands(ops: Sequence[Any], what: str) -> tuple[list[torch.Size], list[str]]:
    """Check operands agree on shape/dtype/device and return the merged parameter layout."""
    if len(ops) == 0:
        raise ValueError(f"{what} needs at least one operator")
    for i, op in enumerate(ops):
        if not isinstance(op, LinearOperator):
            raise TypeError(
                f"{what} operands must be LinearOperators, operand {i} is {type(op).__name__}"
            )
    first = ops[0]
    layout: LinearOperator = first
    for i, op in enumerate(ops[1:], start=1):
        if op.shape != first.shape:
            raise ValueError(
                f"{what}: operand {i} has shape {op.shape}, operand 0 has shape {first.shape}"
            )
        if op.dtype != first.dtype:
            raise ValueError(
                f"{what}: operand {i} has dtype {op.dtype}, operand 0 has dtype {first.dtype}"
            )
        if not _same_device(op.device, first.device):
            raise ValueError(
                f"{what}: operand {i} is on device {op.device}, operand 0 on {first.device}"
            )
        if _is_default_layout(op):
            continue
        if _is_default_layout(layout):
            layout = op
        elif (op._param_shapes, op._param_names) != (layout._param_shapes, layout._param_names):
            raise ValueError(
                f"{what}: operands have different parameter layouts: "
                f"{list(zip(layout._param_names, map(tuple, layout._param_shapes)))} vs "
                f"{list(zip(op._param_names, map(tuple, op._param_shapes)))}"
            )
    return layout.param_shapes, layout.param_names


class SumOperator(LinearOperator):
    """Lazy sum ``A_1 + ... + A_n`` of operators with equal shape, dtype and device.

    Nested sums are flattened. Symmetric if all terms are; known non-symmetric if exactly one
    term is and the rest are symmetric; unknown otherwise.

    Args:
        operators: The terms (at least one).

    Raises:
        TypeError: if a term is not a :class:`LinearOperator`.
        ValueError: on mismatched shape, dtype, device or parameter layout.

    Example:
        >>> from curvlab.operators import DenseOperator
        >>> A = DenseOperator(torch.eye(2))
        >>> SumOperator([A, A, A]) @ torch.ones(2)
        tensor([3., 3.])
    """

    def __init__(self, operators: Sequence[LinearOperator]) -> None:
        if not isinstance(operators, list | tuple):
            raise TypeError(
                f"operators must be a list of LinearOperators, got {type(operators).__name__}"
            )
        shapes, names = _merge_operands(operators, "SumOperator")
        terms: list[LinearOperator] = []
        for op in operators:
            terms.extend(op.operators if isinstance(op, SumOperator) else [op])
        flags = [t.symmetric for t in terms]
        if all(f is True for f in flags):
            symmetric: bool | None = True
        elif flags.count(False) == 1 and flags.count(True) == len(flags) - 1:
            symmetric = False
        else:
            symmetric = None
        super().__init__(
            terms[0].shape,
            terms[0].dtype,
            terms[0].device,
            param_shapes=shapes,
            param_names=names,
            symmetric=symmetric,
        )
        self._terms = terms

    @property
    def operators(self) -> list[LinearOperator]:
        """The terms of the sum."""
        return list(self._terms)

    def _matmat(self, M: Tensor) -> Tensor:
        out = self._terms[0]._apply_columns(M)
        for op in self._terms[1:]:
            out = out + op._apply_columns(M)
        return out

    def _adjoint(self) -> LinearOperator:
        if self._symmetric:
            return self
        return SumOperator([op.T for op in self._terms])

    def diag(self, chunk_size: int | None = None) -> Tensor:
        out = self._terms[0].diag(chunk_size)
        for op in self._terms[1:]:
            out = out + op.diag(chunk_size)
        return out

    def _repr_extra(self) -> str:
        return f"terms={self._terms}"


class ScaledOperator(LinearOperator):
    """Lazy scalar multiple ``alpha * A``; nested scalings are merged.

    Args:
        operator: The operator ``A``.
        alpha: Finite real scalar.

    Raises:
        TypeError: if ``operator`` is not a :class:`LinearOperator` or ``alpha`` not a real number.
        ValueError: if ``alpha`` is not finite.

    Example:
        >>> from curvlab.operators import IdentityOperator
        >>> ScaledOperator(IdentityOperator(2), 3.0) @ torch.ones(2)
        tensor([3., 3.])
    """

    def __init__(self, operator: LinearOperator, alpha: float) -> None:
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a LinearOperator, got {type(operator).__name__}")
        alpha = _check_scalar(alpha, "alpha")
        if isinstance(operator, ScaledOperator):
            alpha, operator = alpha * operator.alpha, operator.operator
        super().__init__(
            operator.shape,
            operator.dtype,
            operator.device,
            param_shapes=operator.param_shapes,
            param_names=operator.param_names,
            symmetric=operator.symmetric,
        )
        self._op = operator
        self._alpha = alpha

    @property
    def operator(self) -> LinearOperator:
        """The unscaled operator."""
        return self._op

    @property
    def alpha(self) -> float:
        """The scalar factor."""
        return self._alpha

    def _matmat(self, M: Tensor) -> Tensor:
        return self._alpha * self._op._apply_columns(M)

    def _adjoint(self) -> LinearOperator:
        if self._symmetric:
            return self
        return ScaledOperator(self._op.T, self._alpha)

    def diag(self, chunk_size: int | None = None) -> Tensor:
        return self._alpha * self._op.diag(chunk_size)

    def _repr_extra(self) -> str:
        return f"alpha={self._alpha}, operator={self._op}"


class ProductOperator(LinearOperator):
    """Lazy composition ``A_1 @ A_2 @ ... @ A_n`` (``A_n`` is applied first).

    Nested products are flattened. The symmetry flag is ``None`` (unknown) for two or more
    factors.

    Args:
        operators: The factors (at least one).

    Raises:
        TypeError: if a factor is not a :class:`LinearOperator`.
        ValueError: on mismatched shape, dtype, device or parameter layout.

    Example:
        >>> from curvlab.operators import DenseOperator
        >>> A = DenseOperator(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        >>> (A @ A.T).to_dense()
        tensor([[1., 0.],
                [0., 0.]])
    """

    def __init__(self, operators: Sequence[LinearOperator]) -> None:
        if not isinstance(operators, list | tuple):
            raise TypeError(
                f"operators must be a list of LinearOperators, got {type(operators).__name__}"
            )
        shapes, names = _merge_operands(operators, "ProductOperator")
        factors: list[LinearOperator] = []
        for op in operators:
            factors.extend(op.operators if isinstance(op, ProductOperator) else [op])
        super().__init__(
            factors[0].shape,
            factors[0].dtype,
            factors[0].device,
            param_shapes=shapes,
            param_names=names,
            symmetric=factors[0].symmetric if len(factors) == 1 else None,
        )
        self._factors = factors

    @property
    def operators(self) -> list[LinearOperator]:
        """The factors, leftmost first."""
        return list(self._factors)

    def _matmat(self, M: Tensor) -> Tensor:
        out = M
        for op in reversed(self._factors):
            out = op._apply_columns(out)
        return out

    def _adjoint(self) -> LinearOperator:
        return ProductOperator([op.T for op in reversed(self._factors)])

    def _repr_extra(self) -> str:
        return f"factors={self._factors}"


class AdjointOperator(LinearOperator):
    """Adjoint ``A.T`` of an operator that implements ``_rmatmat``.

    Usually obtained as ``A.T``; ``A.T.T`` is ``A`` again.

    Args:
        operator: The operator whose adjoint is taken; must implement ``_rmatmat``.

    Raises:
        TypeError: if ``operator`` is not a :class:`LinearOperator` or lacks ``_rmatmat``.

    Example:
        >>> class Shift(LinearOperator):
        ...     def _matmat(self, M):
        ...         return torch.roll(M, 1, dims=0)
        ...     def _rmatmat(self, M):
        ...         return torch.roll(M, -1, dims=0)
        >>> S = Shift((3, 3), torch.float32, "cpu")
        >>> S.T @ torch.tensor([1.0, 2.0, 3.0])
        tensor([2., 3., 1.])
    """

    def __init__(self, operator: LinearOperator) -> None:
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a LinearOperator, got {type(operator).__name__}")
        if type(operator)._rmatmat is LinearOperator._rmatmat:
            raise TypeError(f"{type(operator).__name__} does not implement _rmatmat")
        super().__init__(
            operator.shape,
            operator.dtype,
            operator.device,
            param_shapes=operator.param_shapes,
            param_names=operator.param_names,
            symmetric=operator.symmetric,
        )
        self._op = operator

    @property
    def operator(self) -> LinearOperator:
        """The operator whose adjoint this is."""
        return self._op

    def _matmat(self, M: Tensor) -> Tensor:
        out = self._op._rmatmat(M)
        if not isinstance(out, Tensor) or out.shape != M.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(
                f"{type(self._op).__name__}._rmatmat returned {got}, expected {tuple(M.shape)}"
            )
        return out

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self._op._apply_columns(M)

    def _adjoint(self) -> LinearOperator:
        return self._op

    def _repr_extra(self) -> str:
        return f"operator={self._op}"

