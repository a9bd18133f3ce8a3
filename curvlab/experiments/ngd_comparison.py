"""Old import path of :mod:`curvlab.experiments.studies.ngd_comparison`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.ngd_comparison import (
    METHOD_GRIDS,
    NAME,
    OPTIMIZERS,
    compare_ngd_kfac_sgd,
    small_convnet,
)

__all__ = [
    "METHOD_GRIDS",
    "NAME",
    "OPTIMIZERS",
    "compare_ngd_kfac_sgd",
    "small_convnet",
]
