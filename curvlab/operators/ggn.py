r"""The generalized Gauss-Newton matrix of a loss over a data set.

:math:`G = \sum_b w_b\, J_b^\top H_{L,b} J_b` with :math:`J_b` the Jacobian of the model output on
batch ``b`` w.r.t. the parameters, :math:`H_{L,b}` the Hessian of the loss w.r.t. that output
(closed form for cross-entropy, MSE and BCE-with-logits, autodiff otherwise) and weights
:math:`w_b` from the loss's reduction (:mod:`curvlab.operators.curvature`). For these
exponential-family losses :math:`G` equals the (true) Fisher information and is PSD.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from curvlab.operators.curvature import CurvatureOperator

__all__ = ["GGN"]


class GGN(CurvatureOperator):
    r"""Generalized Gauss-Newton operator :math:`J^\top H_L J` of ``loss_fn`` over ``data``.

    One product costs, per batch, one forward (with the autograd graph), one tangent pass
    :math:`u = Jv`, the closed-form :math:`H_L u`, and one backward. Matrix products reuse the
    forward and push the columns through ``vmap``-ed tangent passes and one batched backward
    (chunks of ``vectorize_chunk`` columns; per-column fallback where ``vmap`` fails).

    Args:
        model: The network (never modified).
        loss_fn: Loss with ``reduction`` 'mean' or 'sum'.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches.
        params: ``None`` for all trainable parameters, or a list/dict subset.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
        >>> G = GGN(net, torch.nn.CrossEntropyLoss(), data)
        >>> G.shape
        (26, 26)
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-6)
        True
    """

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        rule = self.rule
        return self._linearized_products(
            inputs, targets, vs, lambda out, u: rule.hessian_vp(out, targets, u)
        )
