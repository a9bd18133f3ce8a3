"""Old import path of :mod:`curvlab.experiments.studies.cnn_classification`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.cnn_classification import (
    NAME,
    cnn_classification,
    cnn_methods,
    cnn_problem,
    run_cnn_classification,
)

__all__ = [
    "NAME",
    "cnn_classification",
    "cnn_methods",
    "cnn_problem",
    "run_cnn_classification",
]
