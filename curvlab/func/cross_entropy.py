r"""Closed-form rule for ``nn.CrossEntropyLoss``: ``ignore_index``, ``label_smoothing``, ``weight``.

Outputs are ``(N, C)`` or ``(N, C, d1, ...)`` (PyTorch's layout: classes on dim 1, e.g.
``(N, C, S)`` for a sequence), targets class indices of shape ``(N, d1, ...)``. Models with
``(N, S, C)`` logits flatten them to ``(N*S, C)`` (``logits.flatten(0, 1)``) with targets
``(N*S,)``; the rule then treats each position as an example.

With :math:`w` the class weights (ones without ``weight``), :math:`\varepsilon` the label
smoothing, :math:`C` the number of classes and :math:`m_i \in \{0, 1\}` whether target
:math:`y_i` of position :math:`i` is not ``ignore_index``, PyTorch defines

.. math::

    L = \frac1D \sum_i m_i \Big[(1-\varepsilon)\, w_{y_i} (-\log p_{i y_i})
        + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{ic})\Big]
      = \frac1D \sum_i -\langle q_i, \log p_i\rangle,

with :math:`D = \sum_i m_i w_{y_i}` for ``reduction='mean'`` (the count of non-ignored targets
without weights) and :math:`D = 1` for ``'sum'``. Position :math:`i`'s (unnormalized) target
distribution is :math:`q_i = m_i[(1-\varepsilon) w_{y_i} e_{y_i} + \frac{\varepsilon}{C} w]` with
mass :math:`s_i = \sum_c q_{ic}`. Hence, exactly,

* gradient :math:`\partial L/\partial z_i = (s_i p_i - q_i)/D`,
* Hessian block :math:`a_i(\mathrm{diag}(p_i) - p_i p_i^\top)` with :math:`a_i = s_i/D`
  (zero at ignored positions, so ignored positions contribute nothing),
* square root :math:`\sqrt{a_i p_{ik}}(e_k - p_i)`, :math:`k = 1..C`,
* Monte-Carlo gradients :math:`\sqrt{a_i}(p_i - e_{\hat y_i})`, :math:`\hat y_i \sim p_i`: an
  unbiased estimate of the Hessian block (the GGN), zero at ignored positions.

A batch in which every target is ignored has :math:`D = 0` (PyTorch's loss is ``nan``); the
rule gives it zero gradient and curvature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.func.loss_base import LossRule, check_reduction

__all__ = ["CrossEntropyRule"]


class CrossEntropyRule(LossRule):
    """``nn.CrossEntropyLoss`` with class-index targets (see the module docstring).

    Example:
        >>> rule = CrossEntropyRule(torch.nn.CrossEntropyLoss())
        >>> out, y = torch.zeros(2, 3), torch.tensor([0, 2])
        >>> rule.grad(out, y)  # (p - onehot) / N
        tensor([[-0.3333,  0.1667,  0.1667],
                [ 0.1667,  0.1667, -0.3333]])
        >>> padded = CrossEntropyRule(torch.nn.CrossEntropyLoss())  # ignore_index=-100
        >>> padded.grad(out, torch.tensor([0, -100]))  # mean over the one non-ignored target
        tensor([[-0.6667,  0.3333,  0.3333],
                [ 0.0000,  0.0000,  0.0000]])
    """

    name = "CrossEntropyLoss"

    def __init__(self, loss_fn: nn.CrossEntropyLoss) -> None:
        super().__init__(loss_fn)
        self.reduction = check_reduction(loss_fn)
        self.ignore_index = int(loss_fn.ignore_index)
        self.label_smoothing = float(loss_fn.label_smoothing)

    # -- the loss's terms -----------------------------------------------------------------
    def _class_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        w = self.loss_fn.weight
        return None if w is None else w.to(dtype=dtype, device=device)

    def _mask_and_safe(self, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target != self.ignore_index
        return valid, target.masked_fill(~valid, 0)

    def _target_weight(self, target: Tensor, dtype: torch.dtype) -> Tensor:
        """:math:`m_i w_{y_i}`, shape of ``target`` (the terms the 'mean' divides by)."""
        valid, safe = self._mask_and_safe(target)
        w = self._class_weight(dtype, target.device)
        return valid.to(dtype) if w is None else w[safe] * valid

    def _denominator(self, target: Tensor, dtype: torch.dtype, per_example: bool = False
                     ) -> Tensor:
        """:math:`D` (0-dim), or per example ``(N, 1, ...)`` (one dim per target dim); 1 for
        'sum'."""
        if self.reduction == "sum":
            return torch.ones((), dtype=dtype, device=target.device)
        wy = self._target_weight(target, dtype)
        if per_example:
            d = wy.reshape(wy.shape[0], -1).sum(1)
            return d.reshape(-1, *([1] * target.dim()))
        return wy.sum()

    def _mass(self, target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
        """:math:`s_i` shaped ``(N, 1, d...)`` (0 at ignored positions)."""
        valid, safe = self._mask_and_safe(target)
        eps, w = self.label_smoothing, self._class_weight(dtype, target.device)
        if w is None:
            s = valid.to(dtype)
        else:
            s = ((1.0 - eps) * w[safe] + eps / num_classes * w.sum()) * valid
        return s.unsqueeze(1)

    def _target_distribution(self, output: Tensor, target: Tensor) -> Tensor:
        """:math:`q_i`, shaped like ``output`` (0 at ignored positions)."""
        valid, safe = self._mask_and_safe(target)
        eps, w = self.label_smoothing, self._class_weight(output.dtype, output.device)
        num_classes = output.shape[1]
        q = self._onehot(safe, output)
        if eps:
            q = q * (1.0 - eps)
        if w is not None:
            q = q * w[safe].unsqueeze(1)
        if eps:
            smooth = torch.full((num_classes,), eps / num_classes, dtype=output.dtype,
                                device=output.device)
            if w is not None:
                smooth = smooth * w
            q = q + smooth.reshape(1, num_classes, *([1] * (output.dim() - 2)))
        return q * valid.unsqueeze(1).to(output.dtype)

    def _factor(self, output: Tensor, target: Tensor | None, root: bool = False) -> Tensor:
        r""":math:`a_i = s_i / D` (or :math:`\sqrt{a_i}`), broadcastable against ``output``.

        Computed in float64 (where the device has it) and cast once, so that without ignored
        targets, weights and smoothing it equals the plain scale ``1/(number of positions)``.
        """
        acc = _accumulation_dtype(output)
        if target is None:
            if self.loss_fn.weight is not None:
                raise ValueError(
                    "CrossEntropyLoss with class weights: Monte-Carlo Fisher samples need the "
                    "targets (each position's weight); pass target="
                )
            # no targets: every position counts (no ignored targets assumed)
            n = 1 if self.reduction == "sum" else self.num_loss_terms(output)
            a = torch.full((), 1.0 / n, dtype=acc, device=output.device)
        else:
            a = self._mass(target, output.shape[1], acc) * _inverse(
                self._denominator(target, acc)
            )
        return (a.sqrt() if root else a).to(output.dtype)

    @staticmethod
    def _onehot(target: Tensor, output: Tensor) -> Tensor:
        return F.one_hot(target, output.shape[1]).movedim(-1, 1).to(output.dtype)

    # -- LossRule -------------------------------------------------------------------------
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
        num_classes = output.shape[1]
        valid = target != self.ignore_index
        if bool((valid & ((target < 0) | (target >= num_classes))).any()):
            raise ValueError(
                f"CrossEntropyLoss: targets must lie in [0, {num_classes}) or equal "
                f"ignore_index={self.ignore_index}"
            )
        w = self.loss_fn.weight
        if w is not None and w.numel() != num_classes:
            raise ValueError(
                f"CrossEntropyLoss: weight has {w.numel()} entries for {num_classes} classes"
            )

    def num_terms_per_example(self, output: Tensor) -> int:
        """Loss positions per example: the product of the spatial sizes ``d1 * d2 ...``."""
        return output[0, 0].numel()

    def num_loss_terms(self, output: Tensor, target: Tensor | None = None) -> int | float:
        """What ``reduction='mean'`` divides by: :math:`D = \\sum_i m_i w_{y_i}` given the
        targets (the count of non-ignored targets without class weights), else every position.
        """
        if target is None:
            return output.numel() // output.shape[1]
        d = self._target_weight(target, _accumulation_dtype(output)).sum()
        return float(d) if self.loss_fn.weight is not None else int(d)

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.softmax(1)
        g = self._mass(target, p.shape[1], p.dtype) * p - self._target_distribution(output, target)
        return g * _inverse(self._denominator(target, _accumulation_dtype(output))).to(p.dtype)

    def hessian_vp(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        p = output.softmax(1)
        pv = p * v
        return (pv - p * pv.sum(1, keepdim=True)) * self._factor(output, target)

    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        # a (diag(p) - pp^T) = sum_k s_k s_k^T with s_k = sqrt(a p_k) (e_k - p)
        p = output.softmax(1)
        num_classes = output.shape[1]
        eye = torch.eye(num_classes, dtype=output.dtype, device=output.device)
        eye = eye.reshape(num_classes, 1, num_classes, *([1] * (output.dim() - 2)))
        sqrt_p = p.sqrt().movedim(1, 0).unsqueeze(2)  # (C, N, 1, d...)
        return sqrt_p * (eye - p.unsqueeze(0)) * self._factor(output, target, root=True)

    def sample_grads(
        self,
        output: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        """Gradients at targets sampled from the model; ``target`` (the data's targets) gives
        each position its weight :math:`a_i` and zeroes ignored positions. Without it every
        position counts and class weights raise ``ValueError``."""
        p = output.detach().softmax(1)
        root = self._factor(output.detach(), target, root=True)
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])
        idx = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)
        samples = []
        for s in range(mc_samples):
            y = idx[:, s].reshape(p.shape[0], *p.shape[2:])
            samples.append((p - self._onehot(y, output)) * root)
        return torch.stack(samples)

    def per_example_grads(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.softmax(1)
        g = self._mass(target, p.shape[1], p.dtype) * p - self._target_distribution(output, target)
        if self.reduction == "mean":  # each example's own mean: its own denominator
            d = self._denominator(target, p.dtype, per_example=True)
            g = g / torch.where(d == 0, torch.ones_like(d), d)  # all ignored: g is 0
        return g

    def __repr__(self) -> str:
        extra = ""
        if self.ignore_index != -100:
            extra += f", ignore_index={self.ignore_index}"
        if self.label_smoothing:
            extra += f", label_smoothing={self.label_smoothing}"
        if self.loss_fn.weight is not None:
            extra += ", weight=..."
        return f"{type(self).__name__}(reduction={self.reduction!r}{extra})"


def _accumulation_dtype(output: Tensor) -> torch.dtype:
    return output.dtype if output.device.type == "mps" else torch.float64


def _inverse(d: Tensor) -> Tensor:
    """``1 / d`` with 0 where ``d == 0`` (no non-ignored target: nothing to contribute)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, 1.0, d))
