"""Kernel choices under which forward-mode AD (``jvp``, dual tensors) works.

Some fused kernels have no forward-mode derivative: on the CPU, ``scaled_dot_product_attention``
(inside ``nn.MultiheadAttention`` and most transformer blocks) dispatches to a flash-attention
kernel without one. Every tangent pass of curvlab runs under :func:`forward_ad_kernels`, which
restricts attention to the composite "math" kernel (same values up to rounding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["forward_ad_kernels"]


@contextlib.contextmanager
def forward_ad_kernels() -> Iterator[None]:
    """Run a block with kernels that support forward-mode AD (attention: the math backend).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 3, 2, dtype=torch.float64)
        >>> f = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> with forward_ad_kernels():
        ...     torch.func.jvp(f, (q,), (torch.ones_like(q),))[1].shape
        torch.Size([1, 3, 2])
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the attention backends API
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
