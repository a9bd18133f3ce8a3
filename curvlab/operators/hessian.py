r"""The Hessian of a loss over a data set w.r.t. model parameters.

:math:`H = \sum_b w_b \nabla^2_\theta L_b(\theta)` with weights :math:`w_b` from the loss's
reduction (:mod:`curvlab.operators.curvature`), so that for ``'mean'`` the operator equals the
Hessian of the loss on one concatenated batch. Products use forward-over-reverse
(:func:`curvlab.func.products.hessian_vector_products`): one forward and one backward with
forward-mode tangents per column and batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.params import cloned_buffers
from curvlab.func.products import hessian_vector_products
from curvlab.operators.curvature import CurvatureOperator, stack_columns

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    r"""Hessian operator :math:`\nabla^2_\theta L` of ``loss_fn`` over ``data``.

    Symmetric, in general indefinite. A single vector costs one forward and one backward with
    forward-mode tangents per batch. Matrix products ``(P, K)`` run ``torch.func.vmap`` over
    ``jvp(grad)`` in chunks of :attr:`vectorize_chunk` columns; models with train-mode BatchNorm,
    and models where ``vmap`` fails (dropout, a forward-AD gap such as ``mse_loss``), use one
    forward-over-reverse pass per column instead (same result). The RNG state is replayed for
    every column, so dropout in train mode uses one mask per batch and product.

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

    #: Columns per ``vmap``-ed forward-over-reverse pass in a matrix product.
    vectorize_chunk = 16

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        outputs: list[Tensor] = []

        def loss_fn(out: Tensor, y: Any) -> Tensor:
            if not outputs:
                outputs.append(out.detach())
            return self.loss_fn(out, y)

        if len(vs) > 1 and self._can_vmap():
            try:
                return self._vmapped(inputs, targets, vs), self._output_shape_proxy(inputs)
            except (RuntimeError, NotImplementedError, ValueError):
                self._vmap_ok = False  # e.g. dropout (random numbers under vmap)
        prods = hessian_vector_products(self.model, loss_fn, self._params, inputs, targets, vs)
        return stack_columns(prods), outputs[0]

    def _can_vmap(self) -> bool:
        # train-mode BatchNorm under vmap-ed forward-over-reverse is not trusted (batch
        # statistics); such models use the per-column loop
        if not getattr(self, "_vmap_ok", True):
            return False
        return not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for m in self.model.modules()
        )

    def _vmapped(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> Tensor:
        names = list(self._params)
        primals = {n: p.detach() for n, p in self._params.items()}
        buffers = cloned_buffers(self.model)

        def loss_of_params(p: dict[str, Tensor]) -> Tensor:
            out = torch.func.functional_call(self.model, (p, buffers), (inputs,))
            return self.loss_fn(out, targets)

        grad_fn = torch.func.grad(loss_of_params)

        def column(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (t,))[1]

        parts = []
        with torch.enable_grad():
            for start in range(0, len(vs), self.vectorize_chunk):
                chunk = vs[start:start + self.vectorize_chunk]
                tangents = {n: torch.stack([v[i] for v in chunk]) for i, n in enumerate(names)}
                out = torch.func.vmap(column)(tangents)
                parts.append(torch.cat([out[n].reshape(len(chunk), -1) for n in names], 1).T)
        return torch.cat(parts, dim=1).detach()

    def _output_shape_proxy(self, inputs: Any) -> Tensor:
        """Model output on the batch (for the batch weight); cached per batch object."""
        with torch.no_grad():
            return torch.func.functional_call(
                self.model,
                ({n: p.detach() for n, p in self._params.items()}, cloned_buffers(self.model)),
                (inputs,),
            )
