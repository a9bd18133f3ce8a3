"""Matrix-free linear operators over a flat parameter space, and their algebra.

A :class:`LinearOperator` is a square ``P x P`` matrix that is only available through products
with vectors and matrices. ``P`` is the total number of entries of a list of *parameter blocks*
(for curvature operators: the model parameters the curvature is taken with respect to).

Conventions
-----------
* **Flat order.** A parameter-form vector (one tensor per block) corresponds to the flat vector
  obtained by flattening each block row-major (``tensor.reshape(-1)``) and concatenating the
  blocks in the order of :attr:`LinearOperator.param_names`. :func:`flatten_params` and
  :func:`unflatten` convert between the two forms.
* **Default layout.** An operator constructed without ``param_shapes`` has a single block of
  shape ``(P,)`` named ``"param0"``; blocks without explicit names are named ``"param0"``,
  ``"param1"``, ... .
* **Accepted inputs of** ``op @ v``:

  - a flat vector ``(P,)`` -> ``(P,)``;
  - a matrix ``(P, K)`` whose *columns* are flat vectors -> ``(P, K)``;
  - a list/tuple of parameter-shaped tensors -> list of the same shapes; every tensor may also
    carry one trailing batch dimension ``K`` (shape ``(*param_shape, K)``, the same ``K`` for
    all blocks) -> list of the same shapes;
  - a dict ``{name: tensor}`` with exactly the keys :attr:`~LinearOperator.param_names` (same
    shapes as the list form) -> dict in ``param_names`` order;
  - another :class:`LinearOperator` -> the lazy composition ``op @ other``
    (:class:`ProductOperator`).

  Inputs must already have the operator's ``dtype`` and ``device``; nothing is cast silently.
  Wrong lengths, shapes, keys, dtypes or devices raise ``ValueError``; inputs that are not
  tensors raise ``TypeError``. ``v @ op`` for a tensor ``v`` of shape ``(P,)`` or ``(K, P)``
  computes ``(op.T @ v.T).T``.
* **Algebra.** ``A + B``, ``A - B``, ``alpha * A``, ``A * alpha``, ``A / alpha``, ``-A``,
  ``A @ B`` and ``A.T`` build lazy composite operators (:class:`SumOperator`,
  :class:`ScaledOperator`, :class:`ProductOperator`, :class:`AdjointOperator`). Operands must
  have equal shape, dtype and device. The composite keeps the operands' parameter layout; two
  operands with different non-default layouts cannot be combined (``ValueError``).
* **Symmetry flag.** ``op.symmetric`` is ``True`` (known symmetric, ``op.T is op``), ``False``
  (known non-symmetric) or ``None`` (unknown, e.g. a product of operators). Algorithms that need
  a symmetric operator (Lanczos, CG) reject only operators flagged ``False``.

Modules
-------
This module holds :class:`LinearOperator` and re-exports the rest of the operator algebra, so
``from curvlab.operators.base import ...`` keeps working for every name below:

* :mod:`curvlab.operators.flat` -- :func:`flatten_params`, :func:`unflatten` (flat order);
* :mod:`curvlab.operators.forms` -- validation/conversion of the accepted input forms;
* :mod:`curvlab.operators.composite` -- :class:`SumOperator`, :class:`ScaledOperator`,
  :class:`ProductOperator`, :class:`AdjointOperator`;
* :mod:`curvlab.operators.explicit` -- :class:`IdentityOperator`, :class:`DenseOperator`;
* :mod:`curvlab.operators.scipy_export` -- :meth:`LinearOperator.to_scipy`.

Subclassing contract
--------------------
A subclass calls ``super().__init__(shape=(P, P), dtype=..., device=..., param_shapes=...,
param_names=..., symmetric=...)`` and implements **exactly one of** the two product hooks
(implementing neither raises ``TypeError`` at construction):

* ``_matmat(self, M: Tensor) -> Tensor`` -- ``M`` has shape ``(P, K)``, ``K >= 1``, the operator's
  dtype and device; return ``op @ M`` with shape ``(P, K)``, same dtype and device. This is the
  hook the base class calls; override it for speed (e.g. ``torch.func.vmap`` over columns).
* ``_matvec_list(self, vs: list[Tensor]) -> list[Tensor]`` -- ``vs`` holds one tensor per
  block with shape ``param_shapes[i]``; return the product in the same form. The base class then
  derives ``_matmat`` by looping over the columns of ``M`` (unflatten, call, flatten), and
  ``_matvec_list`` from ``_matmat`` in the other case.

Input validation and all conversions between the input forms are done by the base class
before a hook is called; the hook's output is checked for shape, dtype and device
(``RuntimeError`` naming the subclass on violation). Optional hooks:

* ``_rmatmat(self, M) -> Tensor`` -- ``op.T @ M`` for a non-symmetric operator; if present,
  ``op.T`` is an :class:`AdjointOperator` that calls it.
* ``_adjoint(self) -> LinearOperator`` -- full control over ``op.T``. The default returns
  ``self`` if ``symmetric=True``, an :class:`AdjointOperator` if ``_rmatmat`` is implemented, and
  otherwise raises ``NotImplementedError``.
* ``diag()`` and ``to_dense()`` may be overridden with cheaper exact versions.

Example:
    >>> import torch
    >>> class Diag(LinearOperator):
    ...     def __init__(self, d):
    ...         super().__init__((d.numel(), d.numel()), d.dtype, d.device,
    ...                          param_shapes=[torch.Size([2]), torch.Size([1])],
    ...                          param_names=["w", "b"], symmetric=True)
    ...         self.d = d
    ...     def _matmat(self, M):
    ...         return self.d[:, None] * M
    >>> op = Diag(torch.tensor([1.0, 2.0, 3.0]))
    >>> op @ torch.ones(3)
    tensor([1., 2., 3.])
    >>> op @ {"w": torch.ones(2), "b": torch.ones(1)}
    {'w': tensor([1., 2.]), 'b': tensor([3.])}
    >>> (2 * op - IdentityOperator(3)).diag()
    tensor([1., 3., 5.])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from curvlab.func.params import flatten as _func_flatten
from curvlab.operators.flat import (
    _same_device,
    _shape_str,
    check_layout,
    flatten_params,
    unflatten,
)
from curvlab.operators.forms import ParamForms
from curvlab.operators.scipy_export import to_scipy as _to_scipy

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse.linalg

__all__ = [
    "AdjointOperator",
    "DenseOperator",
    "IdentityOperator",
    "LinearOperator",
    "ProductOperator",
    "ScaledOperator",
    "SumOperator",
    "flatten_params",
    "unflatten",
]

# Number of matrix entries materialised per chunk by ``to_dense``/``diag`` (32 MiB in float64).
_DEFAULT_CHUNK_ENTRIES = 2**22


class LinearOperator(ParamForms):
    """Abstract square linear operator ``P x P`` acting on flat or parameter-form vectors.

    See the module docstring for the accepted input forms, the flat order and the subclassing
    contract (implement ``_matmat`` or ``_matvec_list``).

    Args:
        shape: ``(P, P)``.
        dtype: Real floating dtype of inputs and outputs.
        device: Device of inputs and outputs.
        param_shapes: Block shapes in flat order (default: one block ``(P,)``); sizes must sum
            to ``P``.
        param_names: Unique block names, same length as ``param_shapes`` (default
            ``"param0"``, ``"param1"``, ...).
        symmetric: ``True`` if the operator is symmetric (then ``op.T`` is ``op``), ``False`` if
            known not to be, ``None`` if unknown.

    Raises:
        TypeError: on arguments of the wrong type, or if the subclass implements neither
            ``_matmat`` nor ``_matvec_list``.
        ValueError: on a non-square shape or inconsistent parameter layout.

    Example:
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> A
        DenseOperator(shape=(2, 2), dtype=torch.float32, device=cpu, symmetric=True)
        >>> (A + A.T) @ torch.tensor([1.0, 0.0])
        tensor([4., 2.])
    """

    # Make NumPy defer binary operators (``array @ op``) to this class.
    __array_ufunc__ = None

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        param_shapes: Sequence[Sequence[int]] | None = None,
        param_names: Sequence[str] | None = None,
        symmetric: bool | None = None,
    ) -> None:
        cls = type(self)
        if (
            cls._matmat is LinearOperator._matmat
            and cls._matvec_list is LinearOperator._matvec_list
        ):
            raise TypeError(
                f"{cls.__name__} must implement _matmat(M) (columns, (P, K) -> (P, K)) or "
                "_matvec_list(vs) (parameter-shaped list -> list)"
            )
        if (
            not isinstance(shape, tuple | list | torch.Size)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        ):
            raise TypeError(f"shape must be a pair of ints (P, P), got {shape!r}")
        if shape[0] != shape[1]:
            raise ValueError(f"shape must be square (P, P), got {tuple(shape)}")
        if shape[0] < 1:
            raise ValueError(f"shape must have P >= 1, got {tuple(shape)}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a real floating-point dtype, got {dtype}")
        if not isinstance(device, torch.device | str):
            raise TypeError(f"device must be a torch.device or str, got {type(device).__name__}")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True, False or None, got {symmetric!r}")
        p = int(shape[0])
        self._shape = (p, p)
        self._dtype = dtype
        self._device = torch.device(device)
        self._symmetric = symmetric
        self._param_shapes, self._param_names = check_layout(p, param_shapes, param_names)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: give a clear message if a subclass forgot
        # to call LinearOperator.__init__.
        if "_shape" not in vars(self):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: did its __init__ call "
                "LinearOperator.__init__(shape, dtype, device, ...)?"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of inputs and outputs."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of inputs and outputs."""
        return self._device

    @property
    def param_shapes(self) -> list[torch.Size]:
        """Block shapes in flat order (a copy)."""
        return list(self._param_shapes)

    @property
    def param_names(self) -> list[str]:
        """Block names in flat order (a copy)."""
        return list(self._param_names)

    @property
    def symmetric(self) -> bool | None:
        """``True``/``False`` if known (not) to be symmetric, ``None`` if unknown."""
        return self._symmetric

    @property
    def T(self) -> LinearOperator:
        """The adjoint (transpose) operator; ``self`` for symmetric operators."""
        return self._adjoint()

    # ------------------------------------------------------------------ hooks

    def _matmat(self, M: Tensor) -> Tensor:
        """Default ``_matmat`` derived from ``_matvec_list`` (one call per column)."""
        cols = []
        for j in range(M.shape[1]):
            vs = unflatten(M[:, j].contiguous(), self._param_shapes)
            out = self._matvec_list(vs)
            cols.append(self._flatten_hook_output(out))
        return torch.stack(cols, dim=1)

    def _matvec_list(self, vs: list[Tensor]) -> list[Tensor]:
        """Default ``_matvec_list`` derived from ``_matmat``."""
        out = self._apply_columns(flatten_params(vs).unsqueeze(1))[:, 0]
        return unflatten(out, self._param_shapes)

    def _rmatmat(self, M: Tensor) -> Tensor:
        """``self.T @ M``; optional hook for non-symmetric subclasses."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _rmatmat")

    def _adjoint(self) -> LinearOperator:
        """Return the adjoint operator (see the module docstring for the default rules)."""
        if self._symmetric:
            return self
        if type(self)._rmatmat is not LinearOperator._rmatmat:
            return AdjointOperator(self)
        raise NotImplementedError(
            f"{type(self).__name__} has no adjoint: it is not flagged symmetric=True and "
            "implements neither _rmatmat(M) nor _adjoint()"
        )

    def _flatten_hook_output(self, out: Any) -> Tensor:
        name = f"{type(self).__name__}._matvec_list"
        if not isinstance(out, list | tuple) or len(out) != len(self._param_shapes):
            raise RuntimeError(
                f"{name} must return a list of {len(self._param_shapes)} tensors, got "
                f"{type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, list | tuple) else "")
            )
        for i, (t, s) in enumerate(zip(out, self._param_shapes)):
            if not isinstance(t, Tensor) or t.shape != s:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise RuntimeError(
                    f"{name} returned {got} for block {i} ({self._param_names[i]!r}), "
                    f"expected shape {_shape_str(s)}"
                )
        return _func_flatten(out)

    def _apply_columns(self, M: Tensor) -> Tensor:
        """``self @ M`` for a validated ``(P, K)`` matrix; checks the hook's output."""
        if M.shape[1] == 0:
            return M.new_zeros(M.shape)
        out = self._matmat(M)
        if (
            not isinstance(out, Tensor)
            or out.shape != M.shape
            or out.dtype != self._dtype
            or not _same_device(out.device, self._device)
        ):
            got = (
                f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
                if isinstance(out, Tensor)
                else type(out).__name__
            )
            raise RuntimeError(
                f"{type(self).__name__}._matmat returned {got}; expected shape {tuple(M.shape)}, "
                f"dtype {self._dtype}, device {self._device}"
            )
        return out

    # ------------------------------------------------------------------ products

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator([self, other])
        if isinstance(other, Tensor):
            mat = self._check_flat(other)
            out = self._apply_columns(mat)
            return out if other.ndim == 2 else out[:, 0]
        if isinstance(other, Mapping):
            vs = self._dict_to_list(other)
            mat, batched = self._flatten_list(vs, [f"v[{n!r}]" for n in self._param_names])
            out = self._apply_columns(mat)
            parts = unflatten(out if batched else out[:, 0], self._param_shapes)
            return dict(zip(self._param_names, parts))
        if isinstance(other, list | tuple):
            labels = [f"v[{i}] ({n!r})" for i, n in enumerate(self._param_names)]
            mat, batched = self._flatten_list(other, labels)
            out = self._apply_columns(mat)
            return unflatten(out if batched else out[:, 0], self._param_shapes)
        raise TypeError(
            f"{type(self).__name__} @ {type(other).__name__} is not supported: expected a "
            "torch.Tensor (P,) or (P, K), a list/tuple of parameter-shaped tensors, a dict "
            "{name: tensor}, or a LinearOperator"
            + (
                "; convert NumPy arrays with torch.from_numpy"
                if isinstance(other, np.ndarray)
                else ""
            )
        )

    def __rmatmul__(self, other: Any) -> Tensor:
        if not isinstance(other, Tensor):
            raise TypeError(
                f"{type(other).__name__} @ {type(self).__name__} is not supported: the left "
                "operand must be a torch.Tensor of shape (P,) or (K, P)"
            )
        if other.ndim == 1:
            return self.T @ other
        if other.ndim == 2:
            if other.shape[1] != self._shape[1]:
                raise ValueError(
                    f"left operand has shape {tuple(other.shape)}, expected (K, {self._shape[1]})"
                )
            return (self.T @ other.mT).mT
        raise ValueError(f"left operand must have shape (P,) or (K, P), got {tuple(other.shape)}")

    # ------------------------------------------------------------------ algebra

    def _check_operand(self, other: Any, op: str) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            hint = (
                "; wrap explicit matrices in DenseOperator"
                if isinstance(other, Tensor | np.ndarray)
                else ""
            )
            raise TypeError(
                f"unsupported operand for {op}: {type(self).__name__} and "
                f"{type(other).__name__} (expected a LinearOperator){hint}"
            )
        return other

    def __add__(self, other: Any) -> LinearOperator:
        return SumOperator([self, self._check_operand(other, "+")])

    def __radd__(self, other: Any) -> LinearOperator:
        # Only reached for a left operand that is not a LinearOperator.
        raise TypeError(
            f"unsupported operand for +: {type(other).__name__} and {type(self).__name__} "
            "(expected a LinearOperator; use alpha * IdentityOperator(P) for a multiple of I)"
        )

    def __sub__(self, other: Any) -> LinearOperator:
        return SumOperator([self, ScaledOperator(self._check_operand(other, "-"), -1.0)])

    def __rsub__(self, other: Any) -> LinearOperator:
        raise TypeError(
            f"unsupported operand for -: {type(other).__name__} and {type(self).__name__} "
            "(expected a LinearOperator)"
        )

    def __mul__(self, alpha: Any) -> LinearOperator:
        if isinstance(alpha, LinearOperator):
            raise TypeError("use A @ B to compose two LinearOperators; * is for scalars only")
        return ScaledOperator(self, _check_scalar(alpha, "scalar factor"))

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> LinearOperator:
        value = _check_scalar(alpha, "divisor")
        if value == 0.0:
            raise ValueError("divisor must be non-zero")
        return ScaledOperator(self, 1.0 / value)

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    # ------------------------------------------------------------------ export

    def _chunk_size(self, chunk_size: int | None) -> int:
        p = self._shape[0]
        if chunk_size is None:
            return max(1, min(p, _DEFAULT_CHUNK_ENTRIES // p))
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return min(chunk_size, p)

    def _unit_columns(self, start: int, stop: int) -> Tensor:
        p = self._shape[0]
        e = torch.zeros(p, stop - start, dtype=self._dtype, device=self._device)
        idx = torch.arange(stop - start, device=self._device)
        e[start + idx, idx] = 1
        return e

    def to_dense(self, chunk_size: int | None = None) -> Tensor:
        """Materialise the ``(P, P)`` matrix by applying the operator to identity columns.

        Args:
            chunk_size: Number of identity columns per product (bounds the extra memory to
                ``P * chunk_size`` entries). Default: about 4M entries per chunk.

        Returns:
            Dense matrix of shape ``(P, P)`` with the operator's dtype and device.

        Raises:
            ValueError: if ``chunk_size`` is not a positive int.

        Example:
            >>> (2 * IdentityOperator(2)).to_dense()
            tensor([[2., 0.],
                    [0., 2.]])
        """
        cs = self._chunk_size(chunk_size)
        p = self._shape[0]
        out = torch.empty(p, p, dtype=self._dtype, device=self._device)
        for start in range(0, p, cs):
            stop = min(p, start + cs)
            out[:, start:stop] = self._apply_columns(self._unit_columns(start, stop))
        return out

    def diag(self, chunk_size: int | None = None) -> Tensor:
        """Exact diagonal, via products with identity columns (``P`` products in chunks).

        Subclasses with a cheaper exact diagonal override this.

        Args:
            chunk_size: As in :meth:`to_dense`.

        Returns:
            Tensor of shape ``(P,)``.

        Raises:
            ValueError: if ``chunk_size`` is not a positive int.

        Example:
            >>> DenseOperator(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).diag()
            tensor([1., 4.])
        """
        cs = self._chunk_size(chunk_size)
        p = self._shape[0]
        out = torch.empty(p, dtype=self._dtype, device=self._device)
        for start in range(0, p, cs):
            stop = min(p, start + cs)
            cols = self._apply_columns(self._unit_columns(start, stop))
            idx = torch.arange(stop - start, device=self._device)
            out[start:stop] = cols[start + idx, idx]
        return out

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """Wrap as a :class:`scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out).

        NumPy inputs are converted to the operator's dtype and device (an explicit, documented
        cast, e.g. to float32), products run under ``torch.no_grad()``, and results come back
        as float64 NumPy arrays on the CPU. ``rmatvec``/``rmatmat`` use :attr:`T` when the
        operator has an adjoint; otherwise SciPy raises if they are called.

        Returns:
            The SciPy operator of shape ``(P, P)`` and dtype ``float64``.

        Raises:
            ImportError: if SciPy is not installed.

        Example:
            >>> A = DenseOperator(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
            >>> A.to_scipy() @ np.ones(2)
            array([2., 3.])
        """
        return _to_scipy(self)

    # ------------------------------------------------------------------ repr

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        parts = [
            f"shape={self._shape}",
            f"dtype={self._dtype}",
            f"device={self._device}",
            f"symmetric={self._symmetric}",
        ]
        if self._param_names != ["param0"]:
            parts.append(f"params={len(self._param_names)}")
        extra = self._repr_extra()
        return f"{type(self).__name__}({', '.join(parts)}{', ' + extra if extra else ''})"


# The composite and explicit operators subclass LinearOperator, so they are imported after it
# (the package ``__init__`` imports this module first). LinearOperator's algebra (``+``, ``*``,
# ``@``, ``.T``) uses them through these module globals.
from curvlab.operators.composite import (  # noqa: E402
    AdjointOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
    _check_scalar,
)
from curvlab.operators.explicit import DenseOperator, IdentityOperator  # noqa: E402
