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

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

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


# ----------------------------------------------------------------------------------------------
# flat <-> parameter form helpers
# ----------------------------------------------------------------------------------------------


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def flatten_params(tensors: Sequence[Tensor], *, batched: bool = False) -> Tensor:
    """Concatenate parameter-shaped tensors into one flat vector (or matrix of columns).

    Each tensor is flattened row-major and the results are concatenated in list order (the
    curvlab flat order).

    Args:
        tensors: Non-empty list/tuple of tensors with a common dtype and device.
        batched: If ``True``, the last dimension of every tensor is a batch dimension ``K``
            (equal for all tensors) and the result is the ``(P, K)`` matrix whose column ``j``
            is the flattening of ``[t[..., j] for t in tensors]``.

    Returns:
        Tensor of shape ``(P,)`` (or ``(P, K)`` if ``batched``), ``P`` the total number of
        (non-batch) entries.

    Raises:
        TypeError: if ``tensors`` is not a list/tuple of tensors.
        ValueError: if it is empty, mixes dtypes/devices, or (``batched``) the trailing
            dimensions differ or a tensor is 0-dimensional.

    Example:
        >>> flatten_params([torch.tensor([[1, 2], [3, 4]]), torch.tensor([5])])
        tensor([1, 2, 3, 4, 5])
        >>> flatten_params([torch.ones(2, 3), torch.zeros(3)], batched=True).shape
        torch.Size([3, 3])
    """
    if not isinstance(tensors, list | tuple):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("tensors must be non-empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != tensors[0].dtype or t.device != tensors[0].device:
            raise ValueError(
                f"tensors[{i}] has dtype {t.dtype} on {t.device}, but tensors[0] has dtype "
                f"{tensors[0].dtype} on {tensors[0].device}; all must agree"
            )
    if not batched:
        return torch.cat([t.reshape(-1) for t in tensors])
    k = None
    for i, t in enumerate(tensors):
        if t.ndim == 0:
            raise ValueError(f"batched=True needs a trailing batch dimension, tensors[{i}] is 0-d")
        if k is None:
            k = t.shape[-1]
        elif t.shape[-1] != k:
            raise ValueError(
                f"batched=True: tensors[{i}] has trailing dimension {t.shape[-1]}, "
                f"expected {k} like tensors[0]"
            )
    return torch.cat([t.reshape(-1, k) for t in tensors], dim=0)


def unflatten(flat: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Split a flat vector (or matrix of columns) into parameter-shaped tensors.

    Inverse of :func:`flatten_params`. The results are views of ``flat`` where possible.

    Args:
        flat: Tensor of shape ``(P,)`` or ``(P, K)``.
        shapes: Block shapes in flat order; their sizes must sum to ``P``.

    Returns:
        List of tensors of shapes ``shapes[i]`` (or ``(*shapes[i], K)`` for a ``(P, K)`` input).

    Raises:
        TypeError: if ``flat`` is not a tensor.
        ValueError: if ``flat`` is not 1-D/2-D or ``P`` does not match ``shapes``.

    Example:
        >>> [t.shape for t in unflatten(torch.arange(5.0), [(2, 2), (1,)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    if not isinstance(flat, Tensor):
        raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
    if flat.ndim not in (1, 2):
        raise ValueError(f"flat must have shape (P,) or (P, K), got {tuple(flat.shape)}")
    sizes = [_numel(s) for s in shapes]
    if sum(sizes) != flat.shape[0]:
        raise ValueError(
            f"flat has {flat.shape[0]} rows but shapes "
            f"{[_shape_str(s) for s in shapes]} hold {sum(sizes)} entries"
        )
    trailing = tuple(flat.shape[1:])
    parts = torch.split(flat, sizes, dim=0)
    return [p.reshape((*tuple(s), *trailing)) for p, s in zip(parts, shapes)]


def _check_scalar(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = "; use float(t) for a 0-d tensor" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


# ----------------------------------------------------------------------------------------------
# LinearOperator
# ----------------------------------------------------------------------------------------------


class LinearOperator:
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
        self._param_shapes, self._param_names = self._check_layout(p, param_shapes, param_names)

    @staticmethod
    def _check_layout(
        p: int,
        param_shapes: Sequence[Sequence[int]] | None,
        param_names: Sequence[str] | None,
    ) -> tuple[list[torch.Size], list[str]]:
        if param_shapes is None:
            shapes = [torch.Size([p])]
        else:
            if not isinstance(param_shapes, list | tuple) or len(param_shapes) == 0:
                raise TypeError(
                    "param_shapes must be a non-empty list of shapes, got "
                    f"{type(param_shapes).__name__}"
                )
            shapes = []
            for i, s in enumerate(param_shapes):
                if not isinstance(s, list | tuple | torch.Size) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s
                ):
                    raise TypeError(
                        f"param_shapes[{i}] must be a torch.Size or tuple of non-negative ints, "
                        f"got {s!r}"
                    )
                shapes.append(torch.Size(s))
            total = sum(_numel(s) for s in shapes)
            if total != p:
                raise ValueError(
                    f"param_shapes hold {total} entries but shape is ({p}, {p}): "
                    + " + ".join(f"{_numel(s)} {_shape_str(s)}" for s in shapes)
                )
        if param_names is None:
            names = [f"param{i}" for i in range(len(shapes))]
        else:
            if not isinstance(param_names, list | tuple) or not all(
                isinstance(n, str) for n in param_names
            ):
                raise TypeError(f"param_names must be a list of str, got {param_names!r}")
            names = list(param_names)
            if len(names) != len(shapes):
                raise ValueError(
                    f"param_names has {len(names)} entries but param_shapes has {len(shapes)}"
                )
            if len(set(names)) != len(names):
                dups = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"param_names must be unique, duplicates: {dups}")
        return shapes, names

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
        return torch.cat([t.reshape(-1) for t in out])

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

    # ------------------------------------------------------------------ input handling

    def _layout_str(self) -> str:
        parts = [
            f"{n}: {_shape_str(s)} -> {_numel(s)}"
            for n, s in zip(self._param_names, self._param_shapes)
        ]
        return f"P = {self._shape[0]} ({'; '.join(parts)})"

    def _check_tensor_meta(self, t: Tensor, what: str) -> None:
        if t.dtype != self._dtype:
            raise ValueError(
                f"{what} has dtype {t.dtype}, expected {self._dtype} (the operator's dtype; "
                "convert explicitly with .to(dtype))"
            )
        if not _same_device(t.device, self._device):
            raise ValueError(
                f"{what} is on device {t.device}, expected {self._device} (the operator's device)"
            )

    def _check_flat(self, v: Tensor, what: str = "v") -> Tensor:
        """Validate a flat ``(P,)``/``(P, K)`` tensor and return it as ``(P, K)``."""
        p = self._shape[0]
        if v.ndim not in (1, 2):
            raise ValueError(
                f"{what} must have shape (P,) or (P, K) with {self._layout_str()}, "
                f"got a {v.ndim}-d tensor of shape {tuple(v.shape)}"
            )
        if v.shape[0] != p:
            raise ValueError(
                f"{what} has {v.shape[0]} rows (shape {tuple(v.shape)}), "
                f"expected {self._layout_str()}"
            )
        self._check_tensor_meta(v, what)
        return v if v.ndim == 2 else v.unsqueeze(1)

    def _flatten_list(self, vs: Sequence[Any], labels: list[str]) -> tuple[Tensor, bool]:
        """Validate a parameter-form list; return the ``(P, K)`` matrix and whether batched."""
        n = len(self._param_shapes)
        if len(vs) != n:
            raise ValueError(
                f"expected a list of {n} parameter-shaped tensors "
                f"({', '.join(self._param_names)}), got {len(vs)}"
            )
        batched: bool | None = None
        k = 1
        for t, s, label in zip(vs, self._param_shapes, labels):
            if not isinstance(t, Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
            if batched is None:
                if t.shape == s:
                    batched = False
                elif t.ndim == len(s) + 1 and t.shape[:-1] == s:
                    batched, k = True, t.shape[-1]
            if batched is None:
                batch_form = "(" + ", ".join([*(str(d) for d in s), "K"]) + ")"
                raise ValueError(
                    f"{label} has shape {_shape_str(t.shape)}, expected {_shape_str(s)} "
                    f"(or {batch_form} for a batch of K vectors)"
                )
            expected = torch.Size((*s, k)) if batched else s
            if t.shape != expected:
                raise ValueError(
                    f"{label} has shape {_shape_str(t.shape)}, expected {_shape_str(expected)}"
                    + (f" (batch size K = {k} from the first tensor)" if batched else "")
                )
            self._check_tensor_meta(t, label)
        mat = flatten_params(list(vs), batched=True) if batched else flatten_params(list(vs))
        return (mat if batched else mat.unsqueeze(1)), batched

    def _dict_to_list(self, v: Mapping[Any, Any], what: str = "v") -> list[Any]:
        keys = set(v.keys())
        names = set(self._param_names)
        if keys != names:
            missing = [n for n in self._param_names if n not in keys]
            unknown = sorted(map(repr, keys - names))
            raise ValueError(
                f"{what} dict keys must be exactly {self._param_names}; "
                f"missing: {missing}, unknown: [{', '.join(unknown)}]"
            )
        return [v[name] for name in self._param_names]

    def flatten(self, v: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Validate ``v`` in any accepted vector form and return it flat.

        Args:
            v: Flat ``(P,)``/``(P, K)`` tensor, parameter-form list/tuple, or dict (each with
                an optional trailing batch dimension ``K``).

        Returns:
            ``(P,)`` for a single vector, ``(P, K)`` for a batch.

        Raises:
            TypeError: if ``v`` (or an element) is not a tensor.
            ValueError: on wrong length, shapes, keys, dtype or device.

        Example:
            >>> op = IdentityOperator(3, param_shapes=[(2,), (1,)], param_names=["w", "b"])
            >>> op.flatten({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])})
            tensor([1., 2., 3.])
        """
        if isinstance(v, Tensor):
            self._check_flat(v)
            return v
        if isinstance(v, Mapping):
            vs = self._dict_to_list(v)
            mat, batched = self._flatten_list(vs, [f"v[{n!r}]" for n in self._param_names])
        elif isinstance(v, list | tuple):
            labels = [f"v[{i}] ({n!r})" for i, n in enumerate(self._param_names)]
            mat, batched = self._flatten_list(v, labels)
        else:
            raise TypeError(
                "v must be a torch.Tensor, a list/tuple of tensors or a dict {name: tensor}, "
                f"got {type(v).__name__}"
            )
        return mat if batched else mat[:, 0]

    def unflatten(self, flat: Tensor, *, as_dict: bool = False) -> list[Tensor] | dict[str, Tensor]:
        """Split a flat ``(P,)``/``(P, K)`` tensor into this operator's parameter form.

        Args:
            flat: Flat vector or matrix of columns with the operator's dtype and device.
            as_dict: Return ``{name: tensor}`` in ``param_names`` order instead of a list.

        Returns:
            Parameter-shaped tensors (with a trailing ``K`` for a ``(P, K)`` input).

        Raises:
            TypeError: if ``flat`` is not a tensor.
            ValueError: on a wrong shape, dtype or device.

        Example:
            >>> op = IdentityOperator(3, param_shapes=[(2,), (1,)], param_names=["w", "b"])
            >>> op.unflatten(torch.arange(3.0), as_dict=True)
            {'w': tensor([0., 1.]), 'b': tensor([2.])}
        """
        if not isinstance(flat, Tensor):
            raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
        self._check_flat(flat, "flat")
        parts = unflatten(flat, self._param_shapes)
        return dict(zip(self._param_names, parts)) if as_dict else parts

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
        try:
            from scipy.sparse.linalg import LinearOperator as SciPyLinearOperator
        except ImportError as err:  # pragma: no cover - scipy is installed in the test env
            raise ImportError(
                "LinearOperator.to_scipy() requires SciPy, which is not installed; install it "
                "with `pip install scipy` (part of the curvlab[experiments] extra)"
            ) from err
        p = self._shape[0]
        try:
            adjoint: LinearOperator | None = self.T
        except NotImplementedError:
            adjoint = None

        def make(op: LinearOperator) -> Any:
            def matmat(x: Any) -> np.ndarray:
                x = np.asarray(x)
                if np.iscomplexobj(x):
                    raise TypeError("complex inputs are not supported by curvlab operators")
                one_d = x.ndim == 1
                mat = torch.tensor(x.reshape(p, -1), dtype=op.dtype, device=op.device)
                with torch.no_grad():
                    out = op._apply_columns(mat)
                res = out.detach().to(device="cpu", dtype=torch.float64).numpy()
                return res.reshape(p) if one_d else res

            return matmat

        fwd = make(self)
        bwd = make(adjoint) if adjoint is not None else None
        return SciPyLinearOperator(
            shape=(p, p), matvec=fwd, matmat=fwd, rmatvec=bwd, rmatmat=bwd, dtype=np.float64
        )

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


# ----------------------------------------------------------------------------------------------
# composite operators
# ----------------------------------------------------------------------------------------------


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
