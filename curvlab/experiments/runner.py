"""Old import path of :mod:`curvlab.experiments.harness.runner`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.runner import (
    RESERVED_COLUMNS,
    Run,
    RunResult,
    flatten_config,
    read_results,
    run_all,
)

__all__ = [
    "RESERVED_COLUMNS",
    "Run",
    "RunResult",
    "flatten_config",
    "read_results",
    "run_all",
]
