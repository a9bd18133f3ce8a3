r"""Loss-Hessian rules: closed-form output-space derivatives of the supported losses.

One rule object serves the GGN and Fisher products, CurveBall and type-2 K-FAC.

Convention. A batch loss is written :math:`L(\hat y) = c \sum_n \ell(\hat y_n, y_n)` where the
sum runs over the *loss terms* (examples, and for cross-entropy with spatial outputs also
positions; for MSE/BCE every output element) and the scale :math:`c` follows PyTorch's
``reduction``:

===========================  ======================================  ====================
loss                         ``reduction='mean'``                    ``reduction='sum'``
===========================  ======================================  ====================
``CrossEntropyLoss``         :math:`c = 1/(N \prod_i d_i)`           :math:`c = 1`
``MSELoss``                  :math:`c = 1/\text{numel}` (all elems)  :math:`c = 1`
``BCEWithLogitsLoss``        :math:`c = 1/\text{numel}`              :math:`c = 1`
===========================  ======================================  ====================

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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.func.per_example import per_example_output_grads

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "AutodiffLossRule",
    "BCEWithLogitsRule",
    "CrossEntropyRule",
    "LossRule",
    "MSERule",
    "loss_rule",
]


def _block_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product over all non-batch dims, shaped to broadcast against ``a``."""
    prod = (a * b).reshape(a.shape[0], -1).sum(1)
    return prod.reshape(-1, *([1] * (a.dim() - 1)))


class LossRule:
    """Output-space derivatives of a batch loss (abstract base).

    Subclasses implement :meth:`value`, :meth:`grad`, :meth:`hessian_vp`, and where the loss is a
    negative log-likelihood also :meth:`sqrt_hessian` and :meth:`sample_grads`.

    Example:
        >>> rule = loss_rule(torch.nn.CrossEntropyLoss(reduction="sum"))
        >>> isinstance(rule, LossRule)
        True
        >>> out, y = torch.zeros(1, 2), torch.tensor([0])
        >>> S = rule.sqrt_hessian(out, y)          # H_L = sum_k S_k S_k^T
        >>> torch.einsum("kni,knj->ij", S, S)      # diag(p) - p p^T at p = (1/2, 1/2)
        tensor([[ 0.2500, -0.2500],
                [-0.2500,  0.2500]])
    """

    #: Human-readable loss name used in error messages.
    name: str = "loss"
    reduction: str = "mean"

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    # -- to implement -------------------------------------------------------------------
    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise ``ValueError`` naming both shapes when ``output`` and ``target`` don't fit."""

    def value(self, output: Tensor, target: Tensor) -> Tensor:
        """The batch loss :math:`L` (a scalar)."""
        return self.loss_fn(output, target)

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        r""":math:`\partial L/\partial \hat y`, same shape as ``output``."""
        raise NotImplementedError

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        r""":math:`H_L v` for ``v`` shaped like ``output``."""
        raise NotImplementedError

    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        """``S`` of shape ``(K, *output.shape)`` with :math:`H_L=\\sum_{k,n} S_{kn}S_{kn}^T`."""
        raise NotImplementedError(
            f"{self.name}: no closed-form square root of the loss Hessian; type-2 Fisher / KFLR "
            "supports CrossEntropyLoss, MSELoss and BCEWithLogitsLoss"
        )

    def sample_grads(
        self, output: Tensor, mc_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        """``(mc_samples, *output.shape)`` loss gradients at targets sampled from the model."""
        raise NotImplementedError(
            f"{self.name}: Monte-Carlo Fisher needs a likelihood; supported losses are "
            "CrossEntropyLoss, MSELoss and BCEWithLogitsLoss"
        )

    # -- derived ------------------------------------------------------------------------
    def num_examples(self, output: Tensor) -> int:
        """Number of examples (size of dim 0) of a batch output."""
        return int(output.shape[0])

    def num_loss_terms(self, output: Tensor) -> int:
        """Number of terms a ``'mean'`` reduction divides by (here: examples).

        Batches of a data set are weighted by this count so that the aggregate equals the
        loss of one concatenated batch.
        """
        return self.num_examples(output)

    def per_example_grads(self, output: Tensor, target: Tensor) -> Tensor:
        r"""Gradient of each example's *own* loss w.r.t. its output row.

        Example ``n``'s own loss is ``loss_fn(output[n:n+1], target[n:n+1])`` (same reduction).
        Returned stacked, shape of ``output``.
        """
        g = self.grad(output, target)
        if self.reduction == "mean":
            return g * self.num_examples(output)
        return g

    def empirical_fisher_vp(self, output: Tensor, target: Tensor, u: Tensor) -> Tensor:
        r"""Output-space cotangent of the empirical Fisher product.

        With :math:`\tilde g_n` the per-example output gradients (:meth:`per_example_grads`) and
        ``u = J v``, returns :math:`r_n = w\,\tilde g_n \langle \tilde g_n, u_n\rangle` with
        ``w = 1/N`` for ``'mean'`` and ``1`` for ``'sum'``, so that :math:`J^\top r` is
        :math:`w \sum_n g_n g_n^\top v` in parameter space.
        """
        g = self.per_example_grads(output, target)
        r = g * _block_dot(g, u)
        return r / self.num_examples(output) if self.reduction == "mean" else r

    def mc_fisher_vp(
        self,
        output: Tensor,
        u: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Output-space cotangent of the Monte-Carlo Fisher product for ``u = J v``.

        :math:`r_n = \frac1S \sum_s s_{s,n} \langle s_{s,n}, u_n\rangle` with sampled gradients
        :math:`s` from :meth:`sample_grads`; unbiased for :math:`H_L u` (per example).
        """
        samples = self.sample_grads(output, mc_samples, generator)
        r = torch.zeros_like(u)
        for s in samples:
            r = r + s * _block_dot(s, u)
        return r / mc_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


def _check_reduction(loss_fn: nn.Module) -> str:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: curvature needs "
            "a scalar loss, use reduction='mean' or 'sum'"
        )
    return reduction


class CrossEntropyRule(LossRule):
    """``nn.CrossEntropyLoss`` with class-index targets; outputs ``(N, C)`` or ``(N, C, d1, ...)``.

    Example:
        >>> rule = loss_rule(torch.nn.CrossEntropyLoss())
        >>> out, y = torch.zeros(2, 3), torch.tensor([0, 2])
        >>> rule.grad(out, y)  # (p - onehot) / N
        tensor([[-0.3333,  0.1667,  0.1667],
                [ 0.1667,  0.1667, -0.3333]])
    """

    name = "CrossEntropyLoss"

    def __init__(self, loss_fn: nn.CrossEntropyLoss) -> None:
        super().__init__(loss_fn)
        self.reduction = _check_reduction(loss_fn)

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() < 2:
            raise ValueError(
                f"CrossEntropyLoss: output must be (N, C) or (N, C, d1, ...), got shape "
                f"{tuple(output.shape)}"
            )
        expected = (output.shape[0], *output.shape[2:])
        if target.dtype.is_floating_point or tuple(target.shape) != expected:
            raise ValueError(
                f"CrossEntropyLoss: expected integer class-index targets of shape {expected} for "
                f"output shape {tuple(output.shape)}, got {target.dtype} targets of shape "
                f"{tuple(target.shape)}"
            )

    def _scale(self, output: Tensor) -> float:
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (output.numel() // output.shape[1])

    def num_terms_per_example(self, output: Tensor) -> int:
        """Loss terms per example: the product of the spatial sizes ``d1 * d2 ...``."""
        return output[0, 0].numel()

    def num_loss_terms(self, output: Tensor) -> int:
        return output.numel() // output.shape[1]

    def _onehot(self, target: Tensor, output: Tensor) -> Tensor:
        return F.one_hot(target, output.shape[1]).movedim(-1, 1).to(output.dtype)

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.softmax(1)
        return (p - self._onehot(target, output)) * self._scale(output)

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        p = output.softmax(1)
        pv = p * v
        return (pv - p * pv.sum(1, keepdim=True)) * self._scale(output)

    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        # diag(p) - pp^T = sum_k s_k s_k^T with s_k = sqrt(p_k) (e_k - p)
        p = output.softmax(1)
        num_classes = output.shape[1]
        eye = torch.eye(num_classes, dtype=output.dtype, device=output.device)
        eye = eye.reshape(num_classes, 1, num_classes, *([1] * (output.dim() - 2)))
        sqrt_p = p.sqrt().movedim(1, 0).unsqueeze(2)  # (C, N, 1, d...)
        return sqrt_p * (eye - p.unsqueeze(0)) * self._scale(output) ** 0.5

    def sample_grads(
        self, output: Tensor, mc_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        p = output.detach().softmax(1)
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])
        idx = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)
        samples = []
        for s in range(mc_samples):
            y = idx[:, s].reshape(p.shape[0], *p.shape[2:])
            samples.append((p - self._onehot(y, output)) * self._scale(output) ** 0.5)
        return torch.stack(samples)

    def per_example_grads(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.softmax(1)
        g = p - self._onehot(target, output)
        if self.reduction == "mean":
            g = g / self.num_terms_per_example(output)
        return g


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
        self.reduction = _check_reduction(loss_fn)

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.shape != target.shape:
            raise ValueError(
                f"MSELoss: output shape {tuple(output.shape)} and target shape "
                f"{tuple(target.shape)} must be equal (broadcasting is not supported)"
            )

    def _scale(self, output: Tensor) -> float:
        return 1.0 / output.numel() if self.reduction == "mean" else 1.0

    def num_loss_terms(self, output: Tensor) -> int:
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
        self, output: Tensor, mc_samples: int = 1, generator: torch.Generator | None = None
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
        self.reduction = _check_reduction(loss_fn)

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.shape != target.shape:
            raise ValueError(
                f"BCEWithLogitsLoss: output shape {tuple(output.shape)} and target shape "
                f"{tuple(target.shape)} must be equal"
            )

    def _scale(self, output: Tensor) -> float:
        return 1.0 / output.numel() if self.reduction == "mean" else 1.0

    def num_loss_terms(self, output: Tensor) -> int:
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
        self, output: Tensor, mc_samples: int = 1, generator: torch.Generator | None = None
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
            self.reduction = _check_reduction(loss_fn)
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

    ``nn.CrossEntropyLoss`` (no class weights, no label smoothing, default ``ignore_index``
    never hit is assumed), ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss`` (no weights) get closed
    forms; anything else callable gets :class:`AutodiffLossRule`.

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
        if loss_fn.weight is None and loss_fn.label_smoothing == 0.0:
            return CrossEntropyRule(loss_fn)
    elif isinstance(loss_fn, nn.MSELoss):
        return MSERule(loss_fn)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is None and loss_fn.pos_weight is None:
            return BCEWithLogitsRule(loss_fn)
    return AutodiffLossRule(loss_fn)
