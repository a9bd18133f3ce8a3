"""A least-squares residual ``r(params, inputs)`` as a module (CurveBall's Rosenbrock form)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch  # noqa: F401  (doctest namespace)
from torch import Tensor, nn

__all__ = ["ResidualModel"]


class ResidualModel(nn.Module):
    r"""Wrap ``residual_fn(params, inputs) -> r`` as a module whose output is ``r`` as ``(1, m)``.

    With ``nn.MSELoss(reduction="sum")`` against zero targets the loss is
    :math:`f = \lVert r\rVert^2` (no ½) and :math:`H_L = 2I`, the least-squares form CurveBall
    uses for Rosenbrock. The given tensors are wrapped as ``nn.Parameter`` sharing storage, so
    in-place updates are visible to the caller. ``inputs`` carries per-step data such as the
    noise ``ε`` (drawn once per step by the caller and reused within the step).

    Example:
        >>> def res(p, eps):
        ...     u, v = p[0]
        ...     return torch.stack([1 - u, 10 * (v - u**2)])
        >>> m = ResidualModel(res, [torch.tensor([0.0, 0.0])])
        >>> m(None)
        tensor([[1., 0.]], grad_fn=<...>)
    """

    def __init__(self, residual_fn: Callable[[list[Tensor], Any], Tensor],
                 params: Sequence[Tensor]) -> None:
        super().__init__()
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
        if isinstance(params, Tensor) or not isinstance(params, Sequence) or not params:
            raise TypeError("params must be a non-empty list/tuple of tensors")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"params[{i}] must be a floating-point tensor")
        self.residual_fn = residual_fn
        self.params = nn.ParameterList(
            [p if isinstance(p, nn.Parameter) else nn.Parameter(p) for p in params]
        )

    def forward(self, inputs: Any) -> Tensor:
        r = self.residual_fn(list(self.params), inputs)
        if not isinstance(r, Tensor):
            raise TypeError(f"residual_fn must return a tensor, got {type(r).__name__}")
        return r.reshape(1, -1)
