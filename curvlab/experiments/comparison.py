"""Old import path of :mod:`curvlab.experiments.harness.comparison`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.comparison import (
    ComparisonResult,
    TrainingProblem,
    best_methods,
    build_problems,
    method_value,
    not_run_notes,
    run_comparison,
)

__all__ = [
    "ComparisonResult",
    "TrainingProblem",
    "best_methods",
    "build_problems",
    "method_value",
    "not_run_notes",
    "run_comparison",
]
