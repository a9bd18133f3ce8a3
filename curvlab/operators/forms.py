"""The accepted vector forms of ``op @ v``: validation and conversion to ``(P, K)`` columns.

:class:`ParamForms` is the part of :class:`curvlab.operators.base.LinearOperator` that turns a
flat ``(P,)``/``(P, K)`` tensor, a parameter-form list/tuple or a ``{name: tensor}`` dict into
the validated ``(P, K)`` matrix the product hooks see, and back (:meth:`ParamForms.flatten`,
:meth:`ParamForms.unflatten`). It reads the operator's ``_shape``, ``_dtype``, ``_device``,
``_param_shapes`` and ``_param_names`` (set by ``LinearOperator.__init__``) and is not meant to
be used on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.operators.flat import _numel, _same_device, _shape_str, flatten_params, unflatten

__all__ = ["ParamForms"]


class ParamForms:
    """Mixin of :class:`~curvlab.operators.base.LinearOperator`: input forms and conversions."""

    _shape: tuple[int, int]
    _dtype: torch.dtype
    _device: torch.device
    _param_shapes: list[torch.Size]
    _param_names: list[str]

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
            >>> from curvlab.operators import IdentityOperator
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
            >>> from curvlab.operators import IdentityOperator
            >>> op = IdentityOperator(3, param_shapes=[(2,), (1,)], param_names=["w", "b"])
            >>> op.unflatten(torch.arange(3.0), as_dict=True)
            {'w': tensor([0., 1.]), 'b': tensor([2.])}
        """
        if not isinstance(flat, Tensor):
            raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
        self._check_flat(flat, "flat")
        parts = unflatten(flat, self._param_shapes)
        return dict(zip(self._param_names, parts)) if as_dict else parts
