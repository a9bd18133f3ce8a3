"""Loss callables ``loss_fn(output, target) -> scalar`` used by the test problems.

Every function here has the signature curvature operators expect, ``loss_fn(output, target)``,
and documents its scaling (sum vs mean, with or without the factor 1/2), because the scaling
changes every curvature matrix by the same factor.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bernoulli_nll_loss",
    "mean_output_loss",
    "reconstruction_sq_error",
    "sum_of_squares_loss",
]


def _check_pair(output: Tensor, target: Tensor) -> None:
    if not isinstance(output, Tensor) or not isinstance(target, Tensor):
        raise TypeError("output and target must be torch.Tensors")
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape, got {tuple(output.shape)} and "
            f"{tuple(target.shape)}"
        )
    if output.ndim == 0:
        raise ValueError("output must have a leading batch dimension")


def sum_of_squares_loss(
    output: Tensor, target: Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Squared error summed over each example, then averaged (or summed) over the batch.

    ``L = (1/B) sum_i ||output_i - target_i||^2`` for ``reduction="mean"`` (no factor 1/2; this is
    the CurveBall ``'ls'`` loss, whose output Hessian is ``(2/B) I``), or the plain sum of all
    squares for ``reduction="sum"`` (Recht's Rahimi–Recht notebook).  Note the difference to
    ``torch.nn.functional.mse_loss``, which also averages over the output dimension.

    Example:
        >>> import torch
        >>> sum_of_squares_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2))
        tensor(2.5000)
    """
    _check_pair(output, target)
    sq = (output - target).pow(2).reshape(output.shape[0], -1).sum(dim=1)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def mean_output_loss(output: Tensor, target: Tensor | None = None) -> Tensor:
    """Mean of per-example losses produced by the model itself; ``target`` is ignored.

    Used by problems whose model already returns the per-example loss (the DeepOBS 2-D problems).
    Because this loss is linear in the model output, its output Hessian is zero and so is the
    Gauss–Newton matrix of such a problem: use the Hessian there.

    Example:
        >>> import torch
        >>> mean_output_loss(torch.tensor([1.0, 3.0]), None)
        tensor(2.)
    """
    if not isinstance(output, Tensor) or output.ndim != 1:
        raise ValueError("output must be a 1-D tensor of per-example losses")
    return output.mean()


def bernoulli_nll_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits, summed over each example's outputs, averaged over the batch.

    This is the deep-autoencoder objective (logistic output units, Bernoulli likelihood) in the
    per-case scaling used by Martens (2010) and K-FAC; targets are intensities in ``[0, 1]``.

    Example:
        >>> import torch
        >>> round(float(bernoulli_nll_loss(torch.zeros(2, 3), torch.ones(2, 3))), 4)
        2.0794
    """
    _check_pair(logits, target)
    per_elem = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_elem.reshape(logits.shape[0], -1).sum(dim=1).mean()


def reconstruction_sq_error(logits: Tensor, target: Tensor) -> Tensor:
    """``(1/B) sum_i ||sigmoid(logits_i) - target_i||^2``: the auto-encoder error per case.

    This is the "squared error per case" reported in the K-FAC / HF auto-encoder experiments
    (an evaluation metric, not the training loss).

    Example:
        >>> import torch
        >>> reconstruction_sq_error(torch.zeros(1, 4), torch.ones(1, 4))
        tensor(1.)
    """
    _check_pair(logits, target)
    return sum_of_squares_loss(torch.sigmoid(logits), target)
