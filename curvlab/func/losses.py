r"""Loss-Hessian rules: closed-form output-space derivatives of the supported losses.

One rule object serves the GGN and Fisher products, CurveBall and type-2 K-FAC.

Convention. A batch loss is written :math:`L(\hat y) = c \sum_n \ell(\hat y_n, y_n)` where the
sum runs over the *loss terms* (examples, and for cross-entropy with spatial outputs also
positions; for MSE/BCE every output element) and the scale :math:`c` follows PyTorch's
``reduction``:

===========================  ======================================  ====================
loss                         ``reduction='mean'``                    ``reduction='sum'``
===========================  ======================================  ====================
``CrossEntropyLoss``         :math:`c = 1/(N \prod_i d_i)` (*)       :math:`c = 1`
``MSELoss``                  :math:`c = 1/\text{numel}` (all elems)  :math:`c = 1`
``BCEWithLogitsLoss``        :math:`c = 1/\text{numel}`              :math:`c = 1`
===========================  ======================================  ====================

(*) without ignored targets and class weights; in general :math:`1/\sum_i m_i w_{y_i}` and
each term carries its own weight (see :mod:`curvlab.func.cross_entropy`).

Per loss term: cross-entropy :math:`\nabla\ell = p - e_y`, :math:`\nabla^2\ell = \mathrm{diag}(p)
- pp^\top` (softmax over dim 1); MSE :math:`\ell = (\hat y - y)^2` (no 1/2), :math:`\nabla^2\ell
= 2`; BCE-with-logits :math:`\nabla^2\ell = \sigma(1-\sigma)`. The output-space Hessian is
:math:`H_L = c\,\mathrm{blockdiag}(\nabla^2\ell)`.

Square roots (type-2 / KFLR) and Monte-Carlo samples are returned as tensors ``S`` of shape
``(K, *output.shape)`` with :math:`H_L = \sum_k \sum_n S_{k,n} S_{k,n}^\top` (per example ``n``,
examples never mixed) and, for samples, :math:`\mathbb E[\frac1K\sum_k S_{k,n}S_{k,n}^\top] =
(H_L)_{nn}`. The Monte-Carlo targets are drawn from the model's predictive distribution
(categorical, Bernoulli, or Gaussian with variance 1/2 for MSE so that the Fisher equals the GGN).

Any other loss callable gets :class:`AutodiffLossRule`, which differentiates the loss in output
space with ``torch.func`` (GGN products work; Monte-Carlo Fisher and square roots do not, since
they need the loss's likelihood).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.func.cross_entropy import CrossEntropyRule
from curvlab.func.loss_base import LossFn, LossRule, check_reduction
from curvlab.func.per_example import per_example_output_grads

__all__ = [
    "AutodiffLossRule",
    "BCEWithLogitsRule",
    "CrossEntropyRule",
    "LossFn",
    "LossRule",
    "MSERule",
    "loss_rule",
]


class MSERule(LossRule):
    """``nn.MSELoss``: :math:`L = c\\sum_i (\\hat y_i - y_i)^2`, ``c = 1/numel`` for 'mean'.

    Example:
        >>> rule = loss_rule(torch.nn.MSELoss(reduction="sum"))
        >>> rule.hessian_vp(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
        tensor([[2., 2.]])
    """

    name = "MSELoss"

    def __init__(self, loss_fn: nn.MSELoss) -> None:
        super().__init__(loss_fn)
        self.reduction = check_reduction(loss_fn)

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.shape != target.shape:
            raise ValueError(
                f"MSELoss: output shape {tuple(output.shape)} and target shape "
                f"{tuple(target.shape)} must be equal (broadcasting is not supported)"
            )

    def _scale(self, output: Tensor) -> float:
        return 1.0 / output.numel() if self.reduction == "mean" else 1.0

    def num_loss_terms(self, output: Tensor, target: Tensor | None = None) -> int:
        return output.numel()

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        return 2.0 * (output - target) * self._scale(output)

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        return 2.0 * self._scale(output) * v

    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        n = output.shape[0]
        d = output[0].numel()
        eye = torch.eye(d, dtype=output.dtype, device=output.device)
        s = eye.unsqueeze(1).expand(d, n, d).reshape(d, *output.shape)
        return s * (2.0 * self._scale(output)) ** 0.5

    def sample_grads(
        self,
        output: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        # targets y ~ N(yhat, I/2): grad 2(yhat - y) = sqrt(2) * eps, E[ss^T] = 2I = Hessian
        eps = torch.randn(
            (mc_samples, *output.shape),
            generator=generator,
            dtype=output.dtype,
            device=output.device,
        )
        return eps * (2.0 * self._scale(output)) ** 0.5


class BCEWithLogitsRule(LossRule):
    """``nn.BCEWithLogitsLoss`` (no ``weight``/``pos_weight``), targets in [0, 1].

    Example:
        >>> rule = loss_rule(torch.nn.BCEWithLogitsLoss())
        >>> rule.hessian_vp(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
        tensor([[0.1250, 0.1250]])
    """

    name = "BCEWithLogitsLoss"

    def __init__(self, loss_fn: nn.BCEWithLogitsLoss) -> None:
        super().__init__(loss_fn)
        self.reduction = check_reduction(loss_fn)

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.shape != target.shape:
            raise ValueError(
                f"BCEWithLogitsLoss: output shape {tuple(output.shape)} and target shape "
                f"{tuple(target.shape)} must be equal"
            )

    def _scale(self, output: Tensor) -> float:
        return 1.0 / output.numel() if self.reduction == "mean" else 1.0

    def num_loss_terms(self, output: Tensor, target: Tensor | None = None) -> int:
        return output.numel()

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.sigmoid() - target) * self._scale(output)

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        p = output.sigmoid()
        return p * (1 - p) * v * self._scale(output)

    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        n = output.shape[0]
        d = output[0].numel()
        p = output.sigmoid()
        root = (p * (1 - p) * self._scale(output)).sqrt().reshape(n, d)
        eye = torch.eye(d, dtype=output.dtype, device=output.device)
        return (eye.unsqueeze(1) * root.unsqueeze(0)).reshape(d, *output.shape)

    def sample_grads(
        self,
        output: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        p = output.detach().sigmoid()
        u = torch.rand((mc_samples, *output.shape), generator=generator, dtype=p.dtype,
                       device=p.device)
        y = (u < p).to(p.dtype)
        return (p - y) * self._scale(output) ** 0.5


class AutodiffLossRule(LossRule):
    """Fallback for any loss callable ``loss_fn(output, target) -> scalar``.

    ``grad`` and ``hessian_vp`` come from ``torch.func`` (forward-over-reverse in output
    space). The per-example gradient evaluates ``loss_fn`` on each example alone with ``vmap``.

    Example:
        >>> rule = loss_rule(lambda out, y: (out - y).pow(4).sum())
        >>> rule.hessian_vp(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1))
        tensor([[12.]])
    """

    name = "custom loss"

    def __init__(self, loss_fn: LossFn) -> None:
        super().__init__(loss_fn)
        self.name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        if isinstance(loss_fn, nn.Module):
            self.reduction = check_reduction(loss_fn)
        else:
            self.reduction = "custom"

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.func.grad(self.loss_fn)(output.detach(), target)

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        g = torch.func.grad(self.loss_fn)
        return torch.func.jvp(lambda o: g(o, target), (output.detach(),), (v,))[1]

    def per_example_grads(self, output: Tensor, target: Tensor) -> Tensor:
        return per_example_output_grads(self.loss_fn, output, target)

    def empirical_fisher_vp(self, output: Tensor, target: Tensor, u: Tensor) -> Tensor:
        if self.reduction == "custom":
            raise NotImplementedError(
                f"{self.name}: the empirical Fisher needs to know whether the loss is a mean or a "
                "sum over examples; pass an nn.Module loss with reduction='mean' or 'sum'"
            )
        return super().empirical_fisher_vp(output, target, u)


def loss_rule(loss_fn: LossFn) -> LossRule:
    """Pick the loss-Hessian rule for ``loss_fn``.

    ``nn.CrossEntropyLoss`` (any ``ignore_index``, ``label_smoothing`` and class ``weight``, see
    :mod:`curvlab.func.cross_entropy`), ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss`` (no weights)
    get closed forms; anything else callable gets :class:`AutodiffLossRule`.

    Raises:
        TypeError: if ``loss_fn`` is not callable.
        ValueError: for ``reduction='none'``.

    Example:
        >>> loss_rule(torch.nn.MSELoss())
        MSERule(reduction='mean')
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return CrossEntropyRule(loss_fn)
    if isinstance(loss_fn, nn.MSELoss):
        return MSERule(loss_fn)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is None and loss_fn.pos_weight is None:
            return BCEWithLogitsRule(loss_fn)
    return AutodiffLossRule(loss_fn)
