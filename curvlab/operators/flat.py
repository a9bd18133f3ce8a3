"""Flat-vector helpers: the curvlab flat order, parameter layouts and (un)flattening.

A *parameter-form* vector is a list of tensors, one per block; the corresponding *flat* vector
flattens each block row-major (``tensor.reshape(-1)``) and concatenates the blocks in order.
A ``(P, K)`` matrix holds ``K`` flat vectors as columns; in parameter form each block then has a
trailing dimension ``K``.

:func:`flatten_params` and :func:`unflatten` are the operator-layer names. They validate their
arguments (clear ``TypeError``/``ValueError``) and use the function layer's
:func:`curvlab.func.params.flatten` / :func:`curvlab.func.params.unflatten` for the actual
conversion; :func:`flatten_params` adds the batched (``(P, K)`` columns) form.
:func:`check_layout` validates the ``param_shapes``/``param_names`` of an operator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.func.params import flatten as _func_flatten
from curvlab.func.params import unflatten as _func_unflatten

__all__ = ["check_layout", "flatten_params", "unflatten"]


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


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
        return _func_flatten(tensors)
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
    Validates its arguments, then splits with :func:`curvlab.func.params.unflatten` (same
    flat order, same trailing column dimension).

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
    if flat.ndim == 1 and any(len(s) == 0 for s in shapes):
        # curvlab.func.params.unflatten reshapes with ``reshape(*shape)``, which fails for a
        # 0-d block without a trailing dimension: split as one column, then drop it.
        return [t[..., 0] for t in _func_unflatten(flat[:, None], shapes)]
    return _func_unflatten(flat, shapes)


def check_layout(
    p: int,
    param_shapes: Sequence[Sequence[int]] | None,
    param_names: Sequence[str] | None,
) -> tuple[list[torch.Size], list[str]]:
    """Validate a parameter layout of ``P`` entries and fill in the defaults.

    Args:
        p: Total number of entries ``P``.
        param_shapes: Block shapes in flat order, or ``None`` for one block ``(P,)``.
        param_names: Unique block names, or ``None`` for ``"param0"``, ``"param1"``, ...

    Returns:
        ``(shapes, names)`` as a list of ``torch.Size`` and a list of ``str``.

    Raises:
        TypeError: on shapes/names of the wrong type.
        ValueError: if the sizes do not sum to ``P``, the lengths differ or names repeat.

    Example:
        >>> check_layout(3, [(2,), ()], ["w", "b"])
        ([torch.Size([2]), torch.Size([])], ['w', 'b'])
        >>> check_layout(4, None, None)
        ([torch.Size([4])], ['param0'])
    """
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
