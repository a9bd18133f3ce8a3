r"""Fisher information matrices of a loss over a data set: Monte-Carlo and empirical.

* :class:`Fisher` -- :math:`F = \sum_b w_b J_b^\top \hat F_{L,b} J_b` with
  :math:`\hat F_L = \frac1S\sum_s s_s s_s^\top` built from loss gradients :math:`s_s` at targets
  *sampled from the model's predictive distribution* (categorical for cross-entropy, Bernoulli
  for BCE-with-logits, Gaussian with variance 1/2 for MSE). Unbiased for the GGN of the same
  loss; scaled like the loss's reduction.
* :class:`EmpiricalFisher` -- :math:`w \sum_n g_n g_n^\top` with :math:`g_n` the gradient of
  example ``n``'s own loss at its *observed* target; ``w = 1/N`` for ``'mean'``, ``1`` for
  ``'sum'``. Not an estimator of the Fisher in general.

Randomness of :class:`Fisher`: with ``generator=None`` every product draws fresh samples from
the global RNG (a random operator; fine for stochastic optimizers, not for Lanczos). With an
``int`` seed, every product re-creates a generator from that seed, so the operator is a fixed,
deterministic, symmetric PSD linear map (the same samples for every column and every product,
given the data comes in the same order). A ``torch.Generator`` is used as given: samples
advance with every product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import LossFn, LossRule
from curvlab.func.params import ParamsArg
from curvlab.operators.curvature import CurvatureOperator

__all__ = ["EmpiricalFisher", "Fisher"]


class Fisher(CurvatureOperator):
    r"""Monte-Carlo Fisher :math:`J^\top \big(\frac1S\sum_s s_s s_s^\top\big) J` over ``data``.

    Args:
        model: The network (never modified).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction 'mean' or 'sum'.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches (targets are only
            used for validation).
        params: ``None`` for all trainable parameters, or a list/dict subset.
        mc_samples: Number ``S`` of sampled targets per loss term and product.
        generator: ``None`` (fresh samples from the global RNG each product), an ``int`` seed
            (fixed operator: the same samples every product), or a ``torch.Generator``.

    Raises:
        ValueError: for ``mc_samples < 1``.
        TypeError: for a ``generator`` of another type, or a loss without a likelihood.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(50, 3), torch.randint(0, 2, (50,)))
        >>> F = Fisher(net, torch.nn.CrossEntropyLoss(), data, mc_samples=4, generator=0)
        >>> v = torch.randn(8)
        >>> torch.equal(F @ v, F @ v)  # fixed seed: a deterministic linear map
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: ParamsArg = None,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | int | None = None,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if generator is not None and (
            isinstance(generator, bool) or not isinstance(generator, int | torch.Generator)
        ):
            raise TypeError(
                "generator must be None, an int seed or a torch.Generator, got "
                f"{type(generator).__name__}"
            )
        super().__init__(model, loss_fn, data, params)
        if type(self.rule).sample_grads is LossRule.sample_grads:
            raise TypeError(
                f"Fisher: {self.rule.name} has no likelihood to sample targets from; supported "
                "losses are CrossEntropyLoss, MSELoss and BCEWithLogitsLoss"
            )
        self.mc_samples = mc_samples
        self.seed = generator if isinstance(generator, int) else None
        self._generator = generator if isinstance(generator, torch.Generator) else None
        self._active: torch.Generator | None = None

    def _begin_product(self) -> None:
        if self.seed is not None:
            self._active = torch.Generator(device=self.device).manual_seed(self.seed)
        else:
            self._active = self._generator

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        rule, s, gen = self.rule, self.mc_samples, self._active
        cache: list[Tensor] = []

        def prepare(out: Tensor) -> None:
            # one draw per batch and product, shared by every column
            cache.append(rule.sample_grads(out, s, gen, target=targets))

        def output_space(out: Tensor, u: Tensor) -> Tensor:
            samples = cache[0]  # (S, N, ...)
            dots = (samples * u).reshape(s, u.shape[0], -1).sum(-1)  # (S, N)
            dots = dots.reshape(s, u.shape[0], *([1] * (u.dim() - 1)))
            return (samples * dots).sum(0) / s

        return self._linearized_products(inputs, targets, vs, output_space, prepare)

    def _repr_extra(self) -> str:
        return f"loss={self.rule!r}, mc_samples={self.mc_samples}, seed={self.seed}"


class EmpiricalFisher(CurvatureOperator):
    r"""Empirical Fisher :math:`w\sum_n g_n g_n^\top` over ``data`` (``w = 1/N`` for 'mean').

    ``g_n`` is the gradient of example ``n``'s own loss (``loss_fn`` on that example alone, same
    reduction). Computed without per-example gradients: :math:`g_n^\top v` is an output-space
    inner product with :math:`(Jv)_n`, followed by one backward.

    Args:
        model: The network (never modified).
        loss_fn: Loss with reduction 'mean' or 'sum'.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches.
        params: ``None`` for all trainable parameters, or a list/dict subset.

    Example:
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 1)
        >>> net.weight.data.fill_(1.0)  # doctest: +ELLIPSIS
        tensor(...)
        >>> EmpiricalFisher(net, torch.nn.MSELoss(), (x, y)).to_dense()  # g_n = 2 x_n
        tensor([[2., 0.],
                [0., 2.]])
    """

    _weight_by_examples = True

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        rule = self.rule
        return self._linearized_products(
            inputs, targets, vs, lambda out, u: rule.empirical_fisher_vp(out, targets, u)
        )
