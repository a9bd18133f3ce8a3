r"""The :class:`LossRule` interface: output-space derivatives of a batch loss.

See :mod:`curvlab.func.losses` for the scaling convention and the concrete rules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["LossFn", "LossRule", "block_dot", "check_reduction"]


def block_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product over all non-batch dims, shaped to broadcast against ``a``."""
    prod = (a * b).reshape(a.shape[0], -1).sum(1)
    return prod.reshape(-1, *([1] * (a.dim() - 1)))


class LossRule:
    """Output-space derivatives of a batch loss (abstract base).

    Subclasses implement :meth:`value`, :meth:`grad`, :meth:`hessian_vp`, and where the loss is a
    negative log-likelihood also :meth:`sqrt_hessian` and :meth:`sample_grads`.

    Example:
        >>> from curvlab.func import loss_rule
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
        self,
        output: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        """``(mc_samples, *output.shape)`` loss gradients at targets sampled from the model.

        ``target`` (the data's targets, optional) lets a rule weight each loss term as the loss
        does and skip ignored ones (cross-entropy's ``weight``/``ignore_index``).
        """
        raise NotImplementedError(
            f"{self.name}: Monte-Carlo Fisher needs a likelihood; supported losses are "
            "CrossEntropyLoss, MSELoss and BCEWithLogitsLoss"
        )

    # -- derived ------------------------------------------------------------------------
    def num_examples(self, output: Tensor) -> int:
        """Number of examples (size of dim 0) of a batch output."""
        return int(output.shape[0])

    def num_loss_terms(self, output: Tensor, target: Tensor | None = None) -> int | float:
        """Number of terms a ``'mean'`` reduction divides by (here: examples).

        Batches of a data set are weighted by this count so that the aggregate equals the
        loss of one concatenated batch. Pass ``target`` where the count depends on it
        (cross-entropy with ``ignore_index`` or class weights).
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
        r = g * block_dot(g, u)
        return r / self.num_examples(output) if self.reduction == "mean" else r

    def mc_fisher_vp(
        self,
        output: Tensor,
        u: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        r"""Output-space cotangent of the Monte-Carlo Fisher product for ``u = J v``.

        :math:`r_n = \frac1S \sum_s s_{s,n} \langle s_{s,n}, u_n\rangle` with sampled gradients
        :math:`s` from :meth:`sample_grads`; unbiased for :math:`H_L u` (per example).
        """
        samples = self.sample_grads(output, mc_samples, generator, target=target)
        r = torch.zeros_like(u)
        for s in samples:
            r = r + s * block_dot(s, u)
        return r / mc_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


def check_reduction(loss_fn: nn.Module) -> str:
    """The loss's ``reduction`` ('mean' or 'sum'); ``ValueError`` for anything else."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: curvature needs "
            "a scalar loss, use reduction='mean' or 'sum'"
        )
    return reduction
