"""Hutchinson estimators of the trace and the diagonal of a square operator.

For probes ``z`` with i.i.d. zero-mean, unit-variance entries, ``E[z^T A z] = tr(A)`` and
``E[z * (A z)] = diag(A)`` (elementwise product). Rademacher probes (entries +-1) minimise the
variance of the trace estimate (``2 * sum_{i != j} A_ij^2`` for symmetric ``A``) and make both
estimators exact for diagonal ``A``; Gaussian probes have variance ``2 * ||A||_F^2``.

Probes are applied ``batch_size`` at a time as one ``(P, batch_size)`` product ``op @ Z``.
The operator needs only ``op @ M`` for ``M`` of shape ``(P, K)``, ``.shape``, ``.dtype`` and
``.device`` (e.g. a curvlab :class:`~curvlab.operators.base.LinearOperator`); it need not be
symmetric.

Randomness: pass ``generator`` (a :class:`torch.Generator`) for reproducible probes; probes
are drawn on the generator's device and moved to ``op.device``, so a CPU generator gives the
same probes for an operator on any device. ``generator=None`` uses the global RNG of
``op.device``. The same generator state yields the same probes for any ``batch_size``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvlab.linalg._utils import (
    apply,
    check_distribution,
    check_generator,
    check_int,
    check_operator,
    sample_probes,
)

__all__ = ["DiagonalEstimate", "TraceEstimate", "hutchinson_diagonal", "hutchinson_trace"]


class TraceEstimate(NamedTuple):
    """Output of :func:`hutchinson_trace`.

    Attributes:
        estimate: 0-d tensor, the mean of ``samples``.
        standard_error: 0-d tensor, ``std(samples) / sqrt(num_samples)`` (unbiased std;
            NaN for a single sample).
        samples: ``(num_samples,)``, the per-probe estimates ``z_i^T A z_i``.
    """

    estimate: Tensor
    standard_error: Tensor
    samples: Tensor


class DiagonalEstimate(NamedTuple):
    """Output of :func:`hutchinson_diagonal`.

    Attributes:
        estimate: ``(P,)``, the mean of ``z * (A z)`` over the probes.
        standard_error: ``(P,)``, elementwise standard error of that mean (NaN for a single
            sample).
    """

    estimate: Tensor
    standard_error: Tensor


def _check_common(
    op: Any, num_samples: Any, distribution: Any, generator: Any, batch_size: Any
) -> tuple[int, int, str, torch.Generator | None, int]:
    p = check_operator(op)
    num_samples = check_int(num_samples, "num_samples", 1)
    distribution = check_distribution(distribution)
    generator = check_generator(generator)
    batch_size = check_int(batch_size, "batch_size", 1)
    return p, num_samples, distribution, generator, batch_size


def _probe_batches(
    op: Any,
    p: int,
    num_samples: int,
    distribution: str,
    generator: torch.Generator | None,
    batch_size: int,
) -> Any:
    """Yield ``(Z, A @ Z)`` batches. Probes are drawn column by column (batch-size invariant)."""
    done = 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        # One draw per probe keeps the random stream independent of batch_size.
        z = torch.cat(
            [sample_probes(p, 1, distribution, op.dtype, op.device, generator) for _ in range(b)],
            dim=1,
        )
        yield z, apply(op, z)
        done += b


def hutchinson_trace(
    op: Any,
    num_samples: int = 100,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> TraceEstimate:
    """Estimate ``tr(A)`` as the mean of ``z^T A z`` over random probes ``z``.

    Args:
        op: Square operator ``(P, P)`` (see the module docstring).
        num_samples: Number of probes (``>= 1``).
        distribution: ``"rademacher"`` (entries +-1) or ``"gaussian"`` (standard normal).
        generator: Random source for the probes (see the module docstring).
        batch_size: Probes per product ``op @ Z`` with ``Z`` of shape ``(P, batch_size)``.

    Returns:
        :class:`TraceEstimate` ``(estimate, standard_error, samples)`` in the operator's dtype
        and device.

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or an argument is out of range.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> hutchinson_trace(A, num_samples=4, generator=torch.Generator().manual_seed(0)).estimate
        tensor(6.)
    """
    p, num_samples, distribution, generator, batch_size = _check_common(
        op, num_samples, distribution, generator, batch_size
    )
    parts = [
        (z * az).sum(dim=0)
        for z, az in _probe_batches(op, p, num_samples, distribution, generator, batch_size)
    ]
    samples = torch.cat(parts)
    estimate = samples.mean()
    if num_samples > 1:
        standard_error = samples.std(correction=1) / math.sqrt(num_samples)
    else:
        standard_error = torch.full((), math.nan, dtype=samples.dtype, device=samples.device)
    return TraceEstimate(estimate, standard_error, samples)


def hutchinson_diagonal(
    op: Any,
    num_samples: int = 100,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> DiagonalEstimate:
    """Estimate ``diag(A)`` as the mean of ``z * (A z)`` over random probes ``z``.

    The result is flat ``(P,)``; use ``op.unflatten(result.estimate)`` on a curvlab operator to
    get the parameter form. Memory: ``O(P * batch_size)``; the mean and variance are
    accumulated with Chan et al.'s stable batched update.

    Args:
        op: Square operator ``(P, P)`` (see the module docstring).
        num_samples: Number of probes (``>= 1``).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Random source for the probes (see the module docstring).
        batch_size: Probes per product ``op @ Z``.

    Returns:
        :class:`DiagonalEstimate` ``(estimate, standard_error)``, each ``(P,)`` in the
        operator's dtype and device.

    Raises:
        TypeError: if ``op`` is not an operator or an argument has the wrong type.
        ValueError: if ``op`` is non-square or an argument is out of range.

    Example:
        >>> from curvlab.operators.base import DenseOperator
        >>> A = DenseOperator(torch.tensor([[1.0, 5.0], [5.0, 2.0]]))
        >>> hutchinson_diagonal(A, 3, generator=torch.Generator().manual_seed(0)).estimate.shape
        torch.Size([2])
    """
    p, num_samples, distribution, generator, batch_size = _check_common(
        op, num_samples, distribution, generator, batch_size
    )
    n = 0
    mean = torch.zeros(p, dtype=op.dtype, device=op.device)
    m2 = torch.zeros(p, dtype=op.dtype, device=op.device)
    for z, az in _probe_batches(op, p, num_samples, distribution, generator, batch_size):
        x = z * az
        b = x.shape[1]
        batch_mean = x.mean(dim=1)
        batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(dim=1)
        delta = batch_mean - mean
        total = n + b
        mean = mean + delta * (b / total)
        m2 = m2 + batch_m2 + delta**2 * (n * b / total)
        n = total
    if n > 1:
        standard_error = torch.sqrt(m2 / (n - 1) / n)
    else:
        standard_error = torch.full_like(mean, math.nan)
    return DiagonalEstimate(mean, standard_error)
