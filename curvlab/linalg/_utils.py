"""Shared argument checks and helpers for :mod:`curvlab.linalg` (private)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "gaussian")


def check_operator(op: Any, name: str = "op") -> int:
    """Check ``op`` is a square operator with ``@``, ``shape``, ``dtype``, ``device``; return P."""
    for attr in ("shape", "dtype", "device"):
        if not hasattr(op, attr):
            raise TypeError(
                f"{name} must be a linear operator with .shape, .dtype, .device and @ "
                f"(e.g. a curvlab LinearOperator); {type(op).__name__} has no .{attr}"
            )
    if not hasattr(op, "__matmul__"):
        raise TypeError(f"{name} ({type(op).__name__}) does not support @")
    shape = tuple(op.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must have a 2-d shape (P, P), got {shape}")
    if shape[0] != shape[1]:
        raise ValueError(f"{name} must be square (P, P), got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} must have P >= 1, got shape {shape}")
    if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point:
        raise TypeError(f"{name}.dtype must be a real floating-point torch.dtype, got {op.dtype}")
    return int(shape[0])


def check_symmetric(op: Any, name: str, algorithm: str) -> None:
    """Reject operators that declare ``symmetric=False`` (unknown/absent flags are trusted)."""
    if getattr(op, "symmetric", None) is False:
        raise ValueError(
            f"{algorithm} needs a symmetric operator, but {name} ({type(op).__name__}) declares "
            "symmetric=False"
        )


def check_generator(generator: Any) -> torch.Generator | None:
    """Validate the ``generator`` argument."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """Check ``minimum <= value <= maximum`` for an ``int`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_real(
    value: Any, name: str, *, minimum: float | None = None, positive: bool = False
) -> float:
    """Check a finite real number, optionally ``>= minimum`` or ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_distribution(distribution: Any) -> str:
    """Validate a probe distribution name."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality treating a missing index as a wildcard (``cuda`` == ``cuda:0``)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_vector(v: Any, name: str, p: int, op: Any) -> Tensor:
    """Check a flat vector ``(P,)`` with the operator's dtype and device."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.ndim != 1 or v.shape[0] != p:
        raise ValueError(f"{name} must have shape ({p},) (P = {p}), got {tuple(v.shape)}")
    if v.dtype != op.dtype:
        raise ValueError(f"{name} has dtype {v.dtype}, expected the operator's dtype {op.dtype}")
    if not same_device(v.device, op.device):
        raise ValueError(f"{name} is on {v.device}, expected the operator's device {op.device}")
    return v


def apply(op: Any, mat: Tensor) -> Tensor:
    """``op @ mat`` for ``mat`` of shape ``(P, K)``, checking the result's shape."""
    out = op @ mat
    if not isinstance(out, Tensor) or out.shape != mat.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(
            f"{type(op).__name__} @ (P, K) returned {got}, expected {tuple(mat.shape)}"
        )
    return out


def sample_probes(
    p: int,
    k: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Draw a ``(P, K)`` matrix of i.i.d. Rademacher (+-1) or standard normal entries.

    Samples are drawn on the generator's device (or ``device`` with the global RNG when
    ``generator`` is None) and then moved to ``device``, so a CPU generator gives the same
    probes whatever the operator's device.
    """
    gen_device = generator.device if generator is not None else device
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (p, k), generator=generator, device=gen_device)
        z = bits.to(dtype) * 2 - 1
    else:
        z = torch.randn((p, k), generator=generator, device=gen_device, dtype=dtype)
    return z.to(device)
