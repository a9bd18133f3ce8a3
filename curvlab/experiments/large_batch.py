"""Old import path of :mod:`curvlab.experiments.studies.large_batch`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.large_batch import (
    NAME,
    SECOND_AXIS,
    large_batch,
    large_batch_grids,
    large_batch_settings,
    run_large_batch,
    scaling_table,
)

__all__ = [
    "NAME",
    "SECOND_AXIS",
    "large_batch",
    "large_batch_grids",
    "large_batch_settings",
    "run_large_batch",
    "scaling_table",
]
