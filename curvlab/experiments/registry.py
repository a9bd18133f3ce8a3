"""Old import path of :mod:`curvlab.experiments.harness.registry`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.registry import (
    Claim,
    Context,
    Experiment,
    Outcome,
    get_experiment,
    list_experiments,
    make_context,
    register,
    unregister,
)

__all__ = [
    "Claim",
    "Context",
    "Experiment",
    "Outcome",
    "get_experiment",
    "list_experiments",
    "make_context",
    "register",
    "unregister",
]
