r"""The Hessian of a loss over a data set w.r.t. model parameters.

:math:`H = \sum_b w_b \nabla^2_\theta L_b(\theta)` with weights :math:`w_b` from the loss's
reduction (:mod:`curvlab.operators.curvature`), so that for ``'mean'`` the operator equals the
Hessian of the loss on one concatenated batch. Products use forward-over-reverse
(:func:`curvlab.func.products.hessian_vector_products`): one forward and one backward with
forward-mode tangents per column and batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from curvlab.func.losses import LossFn
from curvlab.func.params import ParamsArg
from curvlab.func.products import hessian_vector_products
from curvlab.operators.curvature import CurvatureOperator, stack_columns

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    r"""Hessian operator :math:`\nabla^2_\theta L` of ``loss_fn`` over ``data``.

    Symmetric, in general indefinite. The RNG state is replayed for every column of a matrix
    product, so dropout in train mode uses one mask per batch and product.

    Args:
        model: The network (never modified).
        loss_fn: Loss with ``reduction`` 'mean' or 'sum' (any twice-differentiable callable).
        data: One ``(inputs, targets)`` batch or a re-iterable of batches.
        params: ``None`` for all trainable parameters, or a list/dict subset.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> H = Hessian(net, torch.nn.MSELoss(reduction="sum"), (x, torch.zeros(2, 1)))
        >>> H.to_dense()  # 2 X^T X
        tensor([[2., 0.],
                [0., 8.]])
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: Any, params: ParamsArg = None
    ) -> None:
        super().__init__(model, loss_fn, data, params)

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        outputs: list[Tensor] = []

        def loss_fn(out: Tensor, y: Any) -> Tensor:
            if not outputs:
                outputs.append(out.detach())
            return self.loss_fn(out, y)

        prods = hessian_vector_products(self.model, loss_fn, self._params, inputs, targets, vs)
        return stack_columns(prods), outputs[0]
