"""Shared pieces of the curvlab optimizers: counters, RNG capture/replay, buffer snapshots.

Nothing here is public API; the optimizers in :mod:`curvlab.optim` build on it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.rng import RngState, replay_rng, rng_state

__all__ = [
    "RngState",
    "check_hyper",
    "check_int",
    "dot64",
    "evaluate_output",
    "is_finite",
    "new_counters",
    "replay_rng",
    "restore_buffers",
    "rng_state",
    "snapshot_buffers",
    "warn_skip",
]

COUNTER_KEYS = ("forward", "backward", "jvp", "ggn_products", "steps", "skipped_steps")


def new_counters() -> dict[str, int]:
    """Fresh counters: ``forward``, ``backward``, ``jvp``, ``ggn_products``, ``steps``,
    ``skipped_steps`` (all 0)."""
    return dict.fromkeys(COUNTER_KEYS, 0)


def snapshot_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Clones of all buffers (BatchNorm running statistics), for rollback of a skipped step."""
    return {n: b.clone() for n, b in model.named_buffers() if b is not None}


def restore_buffers(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Copy a :func:`snapshot_buffers` result back into the model's buffers."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n, b in snapshot.items():
            buffers[n].copy_(b)


def dot64(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum_i <a_i, b_i>`` accumulated in float64 (a 0-dim tensor on the tensors' device)."""
    total = None
    for x, y in zip(a, b, strict=True):
        d = torch.sum(x * y, dtype=torch.float64)
        total = d if total is None else total + d
    if total is None:
        raise ValueError("dot64: empty sequence")
    return total


def warn_skip(name: str, what: str, count: int) -> None:
    """Warn that a step was skipped because of a non-finite value."""
    warnings.warn(
        f"{name}: non-finite {what}; the step was skipped, parameters and optimizer state are "
        f"unchanged (skipped steps so far: {count})",
        RuntimeWarning,
        stacklevel=3,
    )


def check_hyper(name: str, value: Any, *, minimum: float | None = None,
                strict: bool = False, allow_none: bool = False) -> float | None:
    """Validate a real hyperparameter; raise ``TypeError``/``ValueError`` naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")
    return value


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer hyperparameter ``>= minimum``; raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def is_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all())


def evaluate_output(model: nn.Module, params: dict[str, Tensor], inputs: Any,
                    rng: RngState, engine: str = "auto") -> Tensor:
    """Model output at the current parameter values, replaying ``rng`` (same dropout masks
    as the forward that captured it) and without updating buffers (BatchNorm in train mode
    normalizes with batch statistics). Uses the same linearization engine as the step's
    forward so the random draws happen in the same order."""
    from curvlab.func import linearize  # local: keep this module import-light

    with replay_rng(rng):
        lin = linearize(model, params, inputs, update_buffers=False, engine=engine)
    return lin.output.detach()
