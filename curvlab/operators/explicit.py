"""Operators given explicitly: the identity and a wrapped dense matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.operators.base import LinearOperator

__all__ = ["DenseOperator", "IdentityOperator"]


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``P`` (returns a copy of its input).

    Args:
        size: ``P``.
        dtype: Dtype (default: ``torch.get_default_dtype()``).
        device: Device (default CPU).
        param_shapes: Optional parameter layout (see :class:`LinearOperator`).
        param_names: Optional block names.

    Raises:
        TypeError: if ``size`` is not an int.
        ValueError: if ``size < 1`` or the layout is inconsistent.

    Example:
        >>> (DenseOperator(torch.eye(2)) + 0.5 * IdentityOperator(2)).diag()
        tensor([1.5000, 1.5000])
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        *,
        param_shapes: Sequence[Sequence[int]] | None = None,
        param_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        super().__init__(
            (size, size),
            torch.get_default_dtype() if dtype is None else dtype,
            device,
            param_shapes=param_shapes,
            param_names=param_names,
            symmetric=True,
        )

    @classmethod
    def like(cls, op: LinearOperator) -> IdentityOperator:
        """Identity with the size, dtype, device and parameter layout of ``op``.

        Args:
            op: The operator to match.

        Returns:
            The matching identity operator.

        Raises:
            TypeError: if ``op`` is not a :class:`LinearOperator`.

        Example:
            >>> A = DenseOperator(torch.eye(2, dtype=torch.float64))
            >>> (A + 0.5 * IdentityOperator.like(A)).diag()
            tensor([1.5000, 1.5000], dtype=torch.float64)
        """
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op must be a LinearOperator, got {type(op).__name__}")
        return cls(
            op.shape[0],
            op.dtype,
            op.device,
            param_shapes=op.param_shapes,
            param_names=op.param_names,
        )

    def _matmat(self, M: Tensor) -> Tensor:
        return M.clone()

    def to_dense(self, chunk_size: int | None = None) -> Tensor:
        self._chunk_size(chunk_size)
        return torch.eye(self._shape[0], dtype=self._dtype, device=self._device)

    def diag(self, chunk_size: int | None = None) -> Tensor:
        self._chunk_size(chunk_size)
        return torch.ones(self._shape[0], dtype=self._dtype, device=self._device)


class DenseOperator(LinearOperator):
    """An explicit ``(P, P)`` matrix as a :class:`LinearOperator`.

    Args:
        matrix: Square real floating-point matrix; dtype and device are taken from it.
        param_shapes: Optional parameter layout (see :class:`LinearOperator`).
        param_names: Optional block names.
        symmetric: ``None`` detects symmetry (``|M - M.T| <= sqrt(eps) * max|M|``); ``True``
            is checked the same way; ``False`` declares it non-symmetric.

    Raises:
        TypeError: if ``matrix`` is not a real floating-point tensor.
        ValueError: if it is not square, or ``symmetric=True`` but it is not symmetric.

    Example:
        >>> A = DenseOperator(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> A.symmetric, (A.T @ torch.tensor([1.0, 0.0]))
        (False, tensor([1., 2.]))
    """

    def __init__(
        self,
        matrix: Tensor,
        *,
        param_shapes: Sequence[Sequence[int]] | None = None,
        param_names: Sequence[str] | None = None,
        symmetric: bool | None = None,
    ) -> None:
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (P, P), got shape {tuple(matrix.shape)}")
        if not matrix.dtype.is_floating_point:
            raise TypeError(f"matrix must have a real floating dtype, got {matrix.dtype}")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True, False or None, got {symmetric!r}")
        if symmetric is not False:
            eps = torch.finfo(matrix.dtype).eps
            scale = matrix.abs().max().item() if matrix.numel() else 0.0
            asym = (matrix - matrix.mT).abs().max().item() if matrix.numel() else 0.0
            is_sym = asym <= math.sqrt(eps) * scale
            if symmetric is True and not is_sym:
                raise ValueError(
                    f"symmetric=True but matrix is not symmetric (max |M - M.T| = {asym:.3g}, "
                    f"max |M| = {scale:.3g})"
                )
            symmetric = is_sym
        super().__init__(
            (matrix.shape[0], matrix.shape[1]),
            matrix.dtype,
            matrix.device,
            param_shapes=param_shapes,
            param_names=param_names,
            symmetric=symmetric,
        )
        self._matrix = matrix

    @property
    def matrix(self) -> Tensor:
        """The wrapped matrix (not a copy)."""
        return self._matrix

    def _matmat(self, M: Tensor) -> Tensor:
        return self._matrix @ M

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self._matrix.mT @ M

    def _adjoint(self) -> LinearOperator:
        # Exact transpose even when the matrix is only numerically symmetric.
        return DenseOperator(
            self._matrix.mT,
            param_shapes=self._param_shapes,
            param_names=self._param_names,
            symmetric=self._symmetric,
        )

    def to_dense(self, chunk_size: int | None = None) -> Tensor:
        self._chunk_size(chunk_size)
        return self._matrix.clone()

    def diag(self, chunk_size: int | None = None) -> Tensor:
        self._chunk_size(chunk_size)
        return self._matrix.diagonal().clone()
