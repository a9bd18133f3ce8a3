"""Old import path of :mod:`curvlab.experiments.harness.optimizers`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.optimizers import (
    OPTIMIZER_NAMES,
    Method,
    build_optimizer,
    unavailable_reason,
)

__all__ = [
    "OPTIMIZER_NAMES",
    "Method",
    "build_optimizer",
    "unavailable_reason",
]
